"""Apigee-specific routes: the seed's connect and catalog sync paths (thin aliases over
the connection endpoints), quota enforcement pushed through the Management API, and
health."""

from __future__ import annotations

import time
from contextlib import aclosing

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sidecar.core.errors import InvalidInput, NotFound
from sidecar.core.models import DEFAULT_TENANT, PLAN_ID_RE, ConsumerStatus, check_id
from sidecar.core.windows import parse_window
from sidecar.http.access import scope
from sidecar.http.admin import change_status
from sidecar.http.admin_request import admin_body, json_response, record
from sidecar.http.bodies import decode, decode_into, read_body
from sidecar.http.connections import (
    guarded,
    health_of,
    postgres,
    pushed,
    seed_connection,
    typed_connection,
)
from sidecar.http.errors import ApiError
from sidecar.http.ingest import ingest_tenant, store_events
from sidecar.integrations import catalog_import
from sidecar.integrations.apigee.analytics import LATE_LIMIT_MS, Analytics, analytics_events
from sidecar.integrations.apigee.importer import client_for
from sidecar.integrations.apigee.mapping import NoQuotaWindow, quota_fields
from sidecar.integrations.connections import CONNECTION_ID_RE

APIGEE_DEFAULT_ID = "apigee"


class CatalogSync(msgspec.Struct, forbid_unknown_fields=True):
    """Without ``token``: the preview (with its token); with it: apply that preview."""

    connection_id: str = APIGEE_DEFAULT_ID
    tenant: str = DEFAULT_TENANT
    token: str | None = None


async def catalog_sync(request: Request) -> Response:
    """The seed's ``POST /integrations/apigee/catalog/sync``: a change preview, then an
    apply of exactly that preview (409 ``catalog_changed`` if anything moved)."""
    ask = decode_into(await admin_body(request), CatalogSync)
    scope(request, ask.tenant)
    check_id(ask.connection_id, CONNECTION_ID_RE, "connection_id")
    catalog, store = await postgres(request)
    await typed_connection(store, ask.tenant, ask.connection_id, ("apigee",))
    ledger = await catalog.ledger()
    if ask.token is None:
        return json_response(
            await guarded(catalog_import.preview(store, ledger, ask.tenant, ask.connection_id))
        )
    if not ask.token:
        raise InvalidInput("token is the token of the preview to apply", field="token")
    applied = await guarded(
        catalog_import.apply(store, ledger, catalog, ask.tenant, ask.connection_id, ask.token)
    )
    record(request, "connection.apply", ask.tenant, ask.connection_id, **applied.counts)
    return json_response(applied)


class EnforceQuota(msgspec.Struct, forbid_unknown_fields=True):
    """An API product's quota: ``window`` and ``limit`` as given, else the plan's (a
    plan with several windows needs ``window`` to say which one Apigee enforces)."""

    connection_id: str
    product: str
    tenant: str = DEFAULT_TENANT
    plan_id: str | None = None
    window: str | None = None
    limit: int | None = None


async def _windows(request: Request, ask: EnforceQuota) -> dict[str, int]:
    if ask.limit is not None:
        if ask.window is None:
            raise InvalidInput("a limit needs its window", field="window")
        return {ask.window: ask.limit}
    if ask.plan_id is None:
        raise InvalidInput("give window and limit, or a plan_id to take them from", field="plan_id")
    check_id(ask.plan_id, PLAN_ID_RE, "plan_id")
    catalog, _ = await postgres(request)
    plans = await (await catalog.ledger()).plans(ask.tenant, ask.plan_id)
    if not plans:
        raise NotFound(f"plan {ask.plan_id!r} does not exist", code="plan_not_found")
    windows = plans[0].plan.windows
    if ask.window is not None:
        if ask.window not in windows:
            raise InvalidInput(f"plan {ask.plan_id!r} has no {ask.window!r} window", field="window")
        return {ask.window: windows[ask.window]}
    return windows


async def enforce_quotas(request: Request) -> Response:
    """``POST /integrations/apigee/enforce/quotas``: make the API product's quota the
    plan's (or the one given): "updated", or "unchanged" without any write."""
    ask = decode_into(await admin_body(request), EnforceQuota)
    scope(request, ask.tenant)
    check_id(ask.connection_id, CONNECTION_ID_RE, "connection_id")
    if not 1 <= len(ask.product) <= 200:
        raise InvalidInput("product must be 1 to 200 characters", field="product")
    windows = await _windows(request, ask)
    for window, limit in windows.items():
        try:
            parse_window(window)
        except ValueError as exc:
            raise InvalidInput(str(exc), code="unknown_window", field="window") from None
        if limit < 0:
            raise InvalidInput("a limit is 0 or more", code="invalid_limit", field="limit")
    try:
        fields = quota_fields(windows)
    except NoQuotaWindow as exc:
        raise InvalidInput(str(exc), code="ambiguous_window", field="window") from None
    _, store = await postgres(request)
    spec = await typed_connection(store, ask.tenant, ask.connection_id, ("apigee",))
    async with aclosing(client_for(spec)) as client:
        result = await guarded(client.set_quota(ask.product, fields))
    detail = {"product": ask.product, "quota": fields, "result": result}
    return await pushed(request, store, ask.tenant, ask.connection_id, "apigee.enforce_quota", detail)


class AppStatusChange(msgspec.Struct, forbid_unknown_fields=True):
    """The seed's suspension of an app: ``mode`` ``suspend`` (reversible) or ``revoke``
    (for good)."""

    appId: str
    developer: str = ""
    mode: str = "suspend"
    reason: str = ""
    tenant: str = DEFAULT_TENANT


_MODES = {"suspend": ConsumerStatus.SUSPENDED, "revoke": ConsumerStatus.REVOKED}


async def suspend(request: Request) -> Response:
    """``POST /integrations/apigee/suspend``: the admin API's status change, pushed to
    Apigee (the app revoked) where the connection says so."""
    change = decode_into(await admin_body(request), AppStatusChange)
    status = _MODES.get(change.mode)
    if status is None:
        raise InvalidInput(f"mode {change.mode!r} is not one of: {', '.join(_MODES)}", field="mode")
    return await change_status(request, change.tenant, change.appId, status, change.reason)


async def resume(request: Request) -> Response:
    change = decode_into(await admin_body(request), AppStatusChange)
    return await change_status(request, change.tenant, change.appId, ConsumerStatus.ACTIVE, change.reason)


# A bucket is remembered for the late-data window plus an hour of slack.
APIGEE_DEDUPE_MS = LATE_LIMIT_MS + 3_600_000
_analytics_decoder = msgspec.json.Decoder(Analytics)


async def ingest(request: Request) -> Response:
    """``POST /integrations/apigee/ingest``: aggregated Apigee analytics (the seed shape)."""
    tenant = ingest_tenant(request)
    settings = request.app.state.settings
    payload = decode(await read_body(request, settings.ingest_max_body_bytes), _analytics_decoder)
    if len(payload.metrics) > settings.ingest_max_events:
        raise ApiError(
            413, "batch_too_large", f"a payload holds at most {settings.ingest_max_events} metrics"
        )
    events, late = analytics_events(payload, tenant=tenant, now_ms=time.time_ns() // 1_000_000)
    # A bucket is accepted again until LATE_LIMIT_MS after its window ended (apigee-pull
    # re-reads that late-data window): it must be recognised for at least that long.
    stored = await store_events(request, events, APIGEE_DEDUPE_MS, rate=settings.apigee_analytics == "rate")
    answer = {
        "status": "ok",
        "recordsProcessed": sum(stored),
        "recordsSkipped": late + len(stored) - sum(stored),
    }
    return json_response(answer)


ROUTES = [
    Route("/integrations/apigee/ingest", ingest, methods=["POST"]),
    Route("/integrations/apigee/suspend", suspend, methods=["POST"]),
    Route("/integrations/apigee/resume", resume, methods=["POST"]),
    Route("/integrations/apigee/connect", seed_connection("apigee", APIGEE_DEFAULT_ID), methods=["POST"]),
    Route("/integrations/apigee/catalog/sync", catalog_sync, methods=["POST"]),
    Route("/integrations/apigee/enforce/quotas", enforce_quotas, methods=["POST"]),
    Route("/integrations/apigee/health", health_of("apigee"), methods=["GET"]),
]
