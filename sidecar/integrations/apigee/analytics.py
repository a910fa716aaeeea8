"""Apigee analytics as usage events: the seed's aggregated shape, and Apigee's stats
API responses turned into it (for `aforo-sidecar apigee-pull`).

The seed shape, posted to POST /integrations/apigee/ingest:

    {"organization": "acme", "environment": "prod",
     "timeRange": {"start": "2026-11-23T10:00:00Z", "end": "2026-11-23T11:00:00Z"},
     "metrics": [{"apiProduct": "premium", "developerApp": "app-7", "developer": "dev@x",
                  "proxy": "payments-v1", "messageCount": 120, "totalResponseTime": 5400,
                  "responseSize": 90000, "errorCount": 3}]}

Each metric row becomes one event standing for ``messageCount`` requests, identified
by (organization, environment, time window, app, product, proxy): the same window
ingested twice is one record.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

import msgspec

from sidecar.core.errors import InvalidInput
from sidecar.core.models import MAX_LIMIT, UsageEvent

LATE_LIMIT_MS = 24 * 3_600_000  # data about a window that ended longer ago is refused


class TimeRange(msgspec.Struct, forbid_unknown_fields=True):
    start: str | int  # ISO 8601 (UTC when no offset) or epoch ms
    end: str | int


class Metric(msgspec.Struct, forbid_unknown_fields=True):
    apiProduct: str
    developerApp: str
    messageCount: int
    developer: str = ""
    proxy: str = ""
    totalResponseTime: int = 0
    responseSize: int = 0
    errorCount: int = 0


class Analytics(msgspec.Struct, forbid_unknown_fields=True):
    organization: str
    environment: str
    timeRange: TimeRange
    metrics: list[Metric]


def epoch_ms(value: str | int, field: str) -> int:
    if isinstance(value, int):
        return value
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput(f"{field} is not an ISO 8601 time: {value!r}", field=field) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def analytics_events(payload: Analytics, *, tenant: str, now_ms: int) -> tuple[list[UsageEvent], int]:
    """The events of a payload, and how many rows were refused for being late (about a
    window that ended more than 24 h ago). Raises InvalidInput for a malformed one."""
    start = epoch_ms(payload.timeRange.start, "timeRange.start")
    end = epoch_ms(payload.timeRange.end, "timeRange.end")
    if end <= start:
        raise InvalidInput("timeRange.end must be after timeRange.start", field="timeRange.end")
    if now_ms - end > LATE_LIMIT_MS:
        return [], len(payload.metrics)
    events = []
    for index, metric in enumerate(payload.metrics):
        for name in ("messageCount", "totalResponseTime", "responseSize", "errorCount"):
            if not 0 <= getattr(metric, name) <= MAX_LIMIT:
                raise InvalidInput(f"{name} must not be negative", field=f"metrics[{index}].{name}")
        if metric.errorCount > metric.messageCount:
            raise InvalidInput("errorCount exceeds messageCount", field=f"metrics[{index}].errorCount")
        identity = "\x1f".join(
            [payload.organization, payload.environment, str(start), str(end), metric.developerApp,
             metric.apiProduct, metric.proxy]
        )  # fmt: skip
        try:
            event = UsageEvent(
                tenant=tenant,
                consumer_id=metric.developerApp,
                request_id="ag-" + hashlib.sha256(identity.encode()).hexdigest()[:40],
                product=metric.apiProduct,
                route=payload.environment,
                service=metric.proxy,
                started_at_ms=start,
                latency_ms=metric.totalResponseTime,
                response_size=metric.responseSize,
                count=metric.messageCount,
                errors=metric.errorCount,
            ).validated()
        except InvalidInput as exc:
            exc.field = f"metrics[{index}].{'developerApp' if exc.field == 'consumer_id' else exc.field}"
            raise
        events.append(event)
    return events, 0


def from_stats_response(response: Any, *, organization: str, time_unit_ms: int) -> list[Analytics]:
    """Apigee's stats API answer for dimensions ``apiproxy,developer_app,api_product``
    with metrics sum(message_count), sum(total_response_time), sum(response_size) and
    sum(is_error), one Analytics payload per time bucket. Each dimension's name is the
    dimension values joined by commas, in the order asked."""
    buckets: dict[tuple[str, int], list[Metric]] = {}
    for environment in response.get("environments", []):
        for dimension in environment.get("dimensions", []):
            proxy, _, rest = dimension["name"].partition(",")
            app, _, product = rest.partition(",")
            values: dict[int, dict[str, int]] = {}
            for metric in dimension.get("metrics", []):
                for point in metric.get("values", []):
                    bucket = values.setdefault(int(point["timestamp"]), {})
                    bucket[metric["name"]] = int(float(point["value"]))
            for timestamp, sums in values.items():
                buckets.setdefault((environment["name"], timestamp), []).append(
                    Metric(
                        apiProduct=product,
                        developerApp=app,
                        proxy=proxy,
                        messageCount=sums.get("sum(message_count)", 0),
                        totalResponseTime=sums.get("sum(total_response_time)", 0),
                        responseSize=sums.get("sum(response_size)", 0),
                        errorCount=sums.get("sum(is_error)", 0),
                    )
                )
    return [
        Analytics(
            organization=organization,
            environment=environment,
            timeRange=TimeRange(start=timestamp, end=timestamp + time_unit_ms),
            metrics=metrics,
        )
        for (environment, timestamp), metrics in sorted(buckets.items())
    ]
