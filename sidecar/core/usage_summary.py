"""A usage summary's question, read from its query parameters and checked. Pure.

from, to       ISO 8601: a date (midnight in ``tz``) or a date and time (with an
               offset or Z; without one, in ``tz``); from < to, whole hours (the
               rollups' resolution), within MAX_RANGE_DAYS of the granularity
granularity    hour, day (the default), week (ISO: from Monday), month
group_by       any of consumer, product, plan, status, comma-separated
consumer_id, product   only those rows
tz             an IANA time zone for the calendar buckets (default UTC); one whose
               offset is not a whole number of hours in the range is refused, since
               its days do not start on the hours the rollups hold
"""

from __future__ import annotations

import functools
import zoneinfo
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta

import msgspec

from sidecar.core.errors import InvalidInput, shown
from sidecar.core.models import CONSUMER_ID_RE, PRODUCT_RE, check_id

GRANULARITIES = ("hour", "day", "week", "month")
# group_by name -> (the rollups' column, the answer's field), in the answer's order
GROUPS = {
    "consumer": ("consumer_id", "consumer_id"),
    "product": ("product", "product"),
    "plan": ("plan_id", "plan_id"),
    "status": ("outcome", "status"),
}
MAX_RANGE_DAYS = {"hour": 31, "day": 366, "week": 731, "month": 1096}
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9000, 1, 1, tzinfo=UTC)
_MAX_TEXT = 64


class SummaryQuery(msgspec.Struct, frozen=True):
    tenant: str
    start: datetime  # UTC
    end: datetime  # UTC, exclusive
    granularity: str = "day"
    group_by: tuple[str, ...] = ()  # GROUPS names, in GROUPS order
    time_zone: str = "UTC"
    consumer_id: str | None = None
    product: str | None = None

    def uses_daily(self) -> bool:
        """Whether the daily rollups answer it exactly: UTC buckets of a day or more over
        whole UTC days."""
        return (
            self.granularity != "hour"
            and self.time_zone == "UTC"
            and all(t == t.replace(hour=0) for t in (self.start, self.end))
        )

    def group_columns(self) -> list[str]:
        """The rollups' columns to group by, each named as the answer's field."""
        columns = []
        for name in self.group_by:
            column, field = GROUPS[name]
            columns.append(column if column == field else f"{column} AS {field}")
        return columns

    def fields(self) -> list[str]:
        """The answer's columns: bucket, the group-by fields, calls, charged, bytes."""
        return ["bucket", *(GROUPS[name][1] for name in self.group_by), "calls", "charged", "bytes"]


@functools.cache
def _zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones()) | {"UTC"}


def zone_of(name: str) -> zoneinfo.ZoneInfo:
    if name not in _zones():
        raise InvalidInput(
            f"tz {shown(name)} is not an IANA time zone (e.g. UTC, Europe/Madrid, America/New_York)",
            code="invalid_time_zone",
            field="tz",
        )
    return zoneinfo.ZoneInfo(name)


def parse_time(text: str | None, zone: zoneinfo.ZoneInfo, field: str) -> datetime:
    if text is None or text == "":
        raise InvalidInput(f"{field} is required", code="invalid_range", field=field)
    try:
        if len(text) > _MAX_TEXT:
            raise ValueError
        value = datetime.fromisoformat(text)
        if value.tzinfo is None:
            value = value.replace(tzinfo=zone)
        value = value.astimezone(UTC)
    except (ValueError, OverflowError):
        raise InvalidInput(
            f"{field} {shown(text)} is not an ISO 8601 date or date and time",
            code="invalid_time",
            field=field,
        ) from None
    if not EARLIEST <= value <= LATEST:
        raise InvalidInput(f"{field} must be between 1970 and 9000", code="invalid_time", field=field)
    return value


def time_range(
    params: Mapping[str, str], zone: zoneinfo.ZoneInfo, max_days: int, why: str = ""
) -> tuple[datetime, datetime]:
    """``from`` and ``to`` (UTC), from before to, at most ``max_days`` apart."""
    start = parse_time(params.get("from"), zone, "from")
    end = parse_time(params.get("to"), zone, "to")
    if start >= end:
        raise InvalidInput("from must be before to", code="invalid_range", field="from")
    if end - start > timedelta(days=max_days):
        raise InvalidInput(f"at most {max_days} days{why}", code="invalid_range", field="to")
    return start, end


def whole_hours(start: datetime, end: datetime) -> None:
    """Both ends on a whole hour (the rollups' and the drift report's resolution)."""
    for field, value in (("from", start), ("to", end)):
        if value != value.replace(minute=0, second=0, microsecond=0):
            raise InvalidInput(
                f"{field} must be a whole hour: the rollups hold hours", code="invalid_range", field=field
            )


def _whole_hour_offsets(zone: zoneinfo.ZoneInfo, start: datetime, end: datetime) -> bool:
    """Whether the zone's offset is a whole number of hours throughout [start, end] (each
    day's, and both ends'), so its calendar buckets start on UTC hours."""
    moments = [start + timedelta(days=d) for d in range((end - start).days + 1)] + [end]
    for moment in moments:
        offset = moment.astimezone(zone).utcoffset()
        if offset is None or offset % timedelta(hours=1):
            return False
    return True


def parse_summary(params: Mapping[str, str], group_by: Sequence[str], tenant: str) -> SummaryQuery:
    """The query of ``GET /v1/usage/summary`` (``group_by``: every value the parameter
    was given, each comma-separated); InvalidInput naming the field at fault."""
    granularity = params.get("granularity") or "day"
    if granularity not in GRANULARITIES:
        raise InvalidInput(
            f"granularity {shown(granularity)} is not one of {', '.join(GRANULARITIES)}",
            code="invalid_granularity",
            field="granularity",
        )
    names = {name.strip() for value in group_by for name in value.split(",") if name.strip()}
    unknown = sorted(names - set(GROUPS))
    if unknown:
        raise InvalidInput(
            f"group_by {shown(unknown[0])} is not one of {', '.join(GROUPS)}",
            code="unknown_group_by",
            field="group_by",
        )
    tz = params.get("tz") or "UTC"
    zone = zone_of(tz)
    start, end = time_range(params, zone, MAX_RANGE_DAYS[granularity], f" with granularity {granularity}")
    if tz != "UTC" and not _whole_hour_offsets(zone, start, end):
        raise InvalidInput(
            f"tz {tz!r} is not a whole number of hours from UTC in this range: its calendar "
            "buckets do not start on the hours the rollups hold",
            code="unsupported_time_zone",
            field="tz",
        )
    whole_hours(start, end)
    consumer_id = params.get("consumer_id") or None
    if consumer_id is not None:
        check_id(consumer_id, CONSUMER_ID_RE, "consumer_id")
    product = params.get("product") or None
    if product is not None:
        check_id(product, PRODUCT_RE, "product")
    return SummaryQuery(
        tenant=tenant,
        start=start,
        end=end,
        granularity=granularity,
        group_by=tuple(name for name in GROUPS if name in names),
        time_zone=tz,
        consumer_id=consumer_id,
        product=product,
    )
