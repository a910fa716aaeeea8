"""Reconciliation reports (Postgres required: 501 ``postgres_required`` otherwise).

GET  /v1/admin/reconciliation                 Redis's windows against the ledger (the
                                              token's tenant; the admin token: all)
GET  /v1/admin/reconciliation?source=gateway&from&to[&tenant]
                                              the ledger's allowed calls against the
                                              gateway's counts per consumer, product and
                                              hour (sidecar/core/drift.py), JSON or CSV,
                                              streamed; read-only
POST /v1/admin/reconciliation/gateway?from&to[&tenant]
                                              the same, stored as a run, one
                                              gateway.drift alert per flagged hour
"""

from __future__ import annotations

import zoneinfo
from collections.abc import Sequence
from datetime import datetime

import asyncpg
import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sidecar.catalog import NeedsPostgres
from sidecar.core.drift import DriftRow
from sidecar.core.errors import InvalidInput
from sidecar.core.usage_summary import time_range, whole_hours
from sidecar.http.access import principal
from sidecar.http.admin_request import actor, json_response, record, tenant_param
from sidecar.http.errors import ApiError
from sidecar.http.streamed import csv_bytes, stream, wants_csv
from sidecar.reconciler import gateway_drift
from sidecar.reconciler.catalog import PostgresCatalog

SOURCES = ("ledger", "gateway")
MAX_DAYS = 31
CSV_FIELDS = ("consumer_id", "product", "hour", "allowed", "gateway", "drift", "drift_pct", "flagged")
_encode = msgspec.json.Encoder().encode
_UTC = zoneinfo.ZoneInfo("UTC")


class GatewayDrift(msgspec.Struct):
    """``GET /v1/admin/reconciliation?source=gateway`` as JSON (streamed: rows last)."""

    tenant: str
    source: str
    start: str
    end: str
    threshold_pct: float
    rows: list[DriftRow] = []


async def _pool(request: Request) -> asyncpg.Pool:
    catalog = request.app.state.catalog
    if not isinstance(catalog, PostgresCatalog):
        raise ApiError(501, "postgres_required", "reports compare with Postgres: set AFORO_DATABASE_URL")
    return (await catalog.ledger()).pool


def _range(request: Request) -> tuple[datetime, datetime]:
    start, end = time_range(request.query_params, _UTC, MAX_DAYS)
    whole_hours(start, end)
    return start, end


class _Form:
    def __init__(
        self, tenant: str, start: datetime, end: datetime, threshold: float, csv_wanted: bool
    ) -> None:
        self.tenant, self.start, self.end, self.threshold = tenant, start, end, threshold
        self.csv = csv_wanted
        self.first = True

    def head(self) -> bytes:
        if self.csv:
            return csv_bytes([CSV_FIELDS])
        iso = gateway_drift.iso
        head = _encode(GatewayDrift(self.tenant, "gateway", iso(self.start), iso(self.end), self.threshold))
        return head[: -len(b"[]}")] + b"["

    def rows(self, records: Sequence[asyncpg.Record]) -> bytes:
        rows = [gateway_drift.drift_row(self.tenant, r, self.threshold) for r in records]
        if self.csv:
            return csv_bytes([getattr(row, f) for f in CSV_FIELDS] for row in rows)
        parts = []
        for row in rows:
            parts.append(_encode(row) if self.first else b"," + _encode(row))
            self.first = False
        return b"".join(parts)

    def tail(self) -> bytes:
        return b"" if self.csv else b"]}"


async def reconciliation(request: Request) -> Response:
    source = request.query_params.get("source", "ledger")
    if source not in SOURCES:
        raise InvalidInput(f"source must be one of {', '.join(SOURCES)}", field="source")
    if source == "gateway":
        return await _gateway(request)
    # ?tenant= names one (that the caller may see); without it, a tenant's token sees its
    # own tenant's consumers, the admin token every tenant's.
    tenant = tenant_param(request) if "tenant" in request.query_params else principal(request).tenant
    try:
        report = await request.app.state.catalog.reconciliation(tenant)
    except NeedsPostgres as exc:
        raise ApiError(501, "postgres_required", str(exc)) from None
    return json_response(report)


async def _gateway(request: Request) -> Response:
    tenant = tenant_param(request)
    start, end = _range(request)
    pool = await _pool(request)
    async with pool.acquire() as conn:
        threshold = await gateway_drift.threshold_of(
            conn, tenant, request.app.state.settings.drift_threshold_pct
        )
    form = _Form(tenant, start, end, threshold, wants_csv(request))
    args = gateway_drift.compare_args(tenant, start, end)
    return await stream(pool, gateway_drift.COMPARE_SQL, args, form, "gateway-drift.csv")


async def run_gateway(request: Request) -> Response:
    tenant = tenant_param(request)
    start, end = _range(request)
    pool = await _pool(request)
    default = request.app.state.settings.drift_threshold_pct
    result = await gateway_drift.run(pool, tenant, start, end, default, actor(request))
    record(request, "reconciliation.gateway", tenant, result.id, flagged=result.flagged, alerts=result.alerts)
    return json_response(result, 201)


ROUTES = [
    Route("/v1/admin/reconciliation", reconciliation, methods=["GET"]),
    Route("/v1/admin/reconciliation/gateway", run_gateway, methods=["POST"]),
]
