"""What consumers have used, for billing teams and customer portals.

    GET /v1/usage/consumers/{consumer_id}/current[?tenant=]
    GET /v1/usage/summary?from&to[&granularity&group_by&consumer_id&product&tz&tenant]

The current period of each limited window (used, limit, remaining, resets_at) and the
wallet, read from the hot store: what the very next decision sees. The summary: calls,
charged micros and bytes per calendar bucket and group, read from the rollups in
Postgres (sidecar/reconciler/rollups.py), as JSON or (``Accept: text/csv``) CSV, both
streamed from a server-side cursor. For the admin, billing and viewer roles, and a
developer token for its own consumers."""

from __future__ import annotations

import zoneinfo
from collections.abc import Sequence

import asyncpg
import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sidecar.core.access import Role
from sidecar.core.clock import now_ms
from sidecar.core.current_usage import current_usage
from sidecar.core.errors import InvalidInput, NotFound
from sidecar.core.models import CONSUMER_ID_RE, check_id
from sidecar.core.usage_summary import SummaryQuery, parse_summary
from sidecar.http.access import scope_consumer
from sidecar.http.admin_request import json_response, tenant_param
from sidecar.http.errors import ApiError
from sidecar.http.streamed import csv_bytes, stream, wants_csv
from sidecar.reconciler import rollups
from sidecar.reconciler.catalog import PostgresCatalog


async def current(request: Request) -> Response:
    tenant = tenant_param(request)
    consumer_id = check_id(request.path_params["consumer_id"], CONSUMER_ID_RE, "consumer_id")
    scope_consumer(request, tenant, consumer_id)
    store = request.app.state.store
    now = now_ms()
    view = await store.get_consumer(tenant, consumer_id, now)
    if view is None:
        raise NotFound(f"consumer {consumer_id!r} does not exist", code="consumer_not_found")
    plan = await store.get_plan(tenant, view.plan_id)
    if plan is None:  # deleted under it (a plan in use cannot be, but a race can)
        raise NotFound(f"plan {view.plan_id!r} does not exist", code="plan_not_found")
    return json_response(current_usage(view, plan, now))


class SummaryRow(msgspec.Struct, omit_defaults=True):
    """One bucket of one group: the group-by fields it was asked for, and its sums."""

    bucket: str  # the bucket's start, ISO 8601 in the query's time zone
    calls: int
    charged: int  # micros
    bytes: int
    consumer_id: str | None = None
    product: str | None = None
    plan_id: str | None = None
    status: str | None = None


class UsageSummary(msgspec.Struct):
    """``GET /v1/usage/summary`` as JSON (for the contract: the answer is streamed)."""

    tenant: str
    from_: str = msgspec.field(name="from")
    to: str = ""
    granularity: str = "day"
    time_zone: str = "UTC"
    group_by: list[str] = []
    source: str = "daily"  # the rollups read: daily or hourly
    buckets: list[SummaryRow] = []


_encode = msgspec.json.Encoder().encode


class _Format:
    """How a summary's head, rows and tail are written."""

    def __init__(self, query: SummaryQuery, csv_wanted: bool) -> None:
        self.query = query
        self.csv = csv_wanted
        self.zone = zoneinfo.ZoneInfo(query.time_zone)
        self.fields = query.fields()
        self.first = True

    def head(self) -> bytes:
        if self.csv:
            return csv_bytes([self.fields])
        q = self.query
        head = _encode(
            UsageSummary(
                tenant=q.tenant,
                from_=q.start.astimezone(self.zone).isoformat(),
                to=q.end.astimezone(self.zone).isoformat(),
                granularity=q.granularity,
                time_zone=q.time_zone,
                group_by=list(q.group_by),
                source="daily" if q.uses_daily() else "hourly",
            )
        )
        return head[: -len(b"[]}")] + b"["  # the buckets follow

    def rows(self, records: Sequence[asyncpg.Record]) -> bytes:
        if self.csv:
            return csv_bytes([self._bucket(r["bucket"]), *(r[f] for f in self.fields[1:])] for r in records)
        parts = []
        for r in records:
            row = SummaryRow(bucket=self._bucket(r["bucket"]), **{f: r[f] for f in self.fields[1:]})
            parts.append(_encode(row) if self.first else b"," + _encode(row))
            self.first = False
        return b"".join(parts)

    def tail(self) -> bytes:
        return b"" if self.csv else b"]}"

    def _bucket(self, value: object) -> str:
        return value.astimezone(self.zone).isoformat()  # type: ignore[attr-defined]


async def summary(request: Request) -> Response:
    tenant = tenant_param(request)
    query = parse_summary(request.query_params, request.query_params.getlist("group_by"), tenant)
    who = getattr(request.state, "principal", None)
    mine: list[str] | None = None
    if query.consumer_id is not None:
        scope_consumer(request, tenant, query.consumer_id)
    elif who is not None and who.role is Role.DEVELOPER:
        mine = sorted(who.consumers)  # a developer token sees its own consumers only
    catalog = request.app.state.catalog
    if not isinstance(catalog, PostgresCatalog):
        raise ApiError(
            501, "postgres_required", "the usage rollups are kept in Postgres: set AFORO_DATABASE_URL"
        )
    ledger = await catalog.ledger()
    sql, args = rollups.summary(query, mine)
    try:
        return await stream(ledger.pool, sql, args, _Format(query, wants_csv(request)), "usage-summary.csv")
    except asyncpg.InvalidParameterValueError:
        raise InvalidInput(
            f"tz {query.time_zone!r} is not a time zone Postgres knows", code="invalid_time_zone", field="tz"
        ) from None


ROUTES = [
    Route("/v1/usage/consumers/{consumer_id}/current", current, methods=["GET"]),
    Route("/v1/usage/summary", summary, methods=["GET"]),
]
