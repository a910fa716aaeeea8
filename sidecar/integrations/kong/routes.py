"""Kong-specific routes: native enforcement pushed through a connection's Admin API."""

from __future__ import annotations

from contextlib import aclosing
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sidecar.core.errors import InvalidInput, NotFound
from sidecar.core.models import DEFAULT_TENANT, PLAN_ID_RE, ConsumerStatus, check_id
from sidecar.core.windows import parse_window
from sidecar.http import connections
from sidecar.http.access import scope
from sidecar.http.admin import StatusChange, change_status
from sidecar.http.admin_request import admin_body, json_response, tenant_param
from sidecar.http.bodies import decode, decode_into, read_body
from sidecar.http.connections import (
    for_connection,
    guarded,
    health_of,
    postgres,
    pushed,
    seed_connection,
    typed_connection,
)
from sidecar.http.errors import ApiError
from sidecar.http.ingest import ingest_tenant, store_events
from sidecar.integrations.connections import CONNECTION_ID_RE
from sidecar.integrations.kong.admin_client import enforce_group
from sidecar.integrations.kong.importer import client_for
from sidecar.integrations.kong.log_entries import KongPayload, kong_log_event
from sidecar.integrations.kong.mapping import UnsupportedWindow, rate_limiting_config


class EnforceGroup(msgspec.Struct, forbid_unknown_fields=True):
    """The limits of a consumer group (its id or name): ``limits`` as given, else those
    of ``plan_id`` in the sidecar's catalog."""

    connection_id: str
    group: str
    tenant: str = DEFAULT_TENANT
    plan_id: str | None = None
    limits: dict[str, int] | None = None


async def enforce_groups(request: Request) -> Response:
    ask = decode_into(await admin_body(request), EnforceGroup)
    scope(request, ask.tenant)
    check_id(ask.connection_id, CONNECTION_ID_RE, "connection_id")
    if not 1 <= len(ask.group) <= 200:
        raise InvalidInput("group must be 1 to 200 characters", field="group")
    catalog, store = await postgres(request)
    limits = ask.limits
    if limits is None:
        if ask.plan_id is None:
            raise InvalidInput("give limits or a plan_id to take them from", field="plan_id")
        check_id(ask.plan_id, PLAN_ID_RE, "plan_id")
        plans = await (await catalog.ledger()).plans(ask.tenant, ask.plan_id)
        if not plans:
            raise NotFound(f"plan {ask.plan_id!r} does not exist", code="plan_not_found")
        limits = plans[0].plan.windows
    for window, limit in limits.items():
        try:
            parse_window(window)
        except ValueError as exc:
            raise InvalidInput(str(exc), code="unknown_window", field=f"limits.{window}") from None
        if limit < 0:
            raise InvalidInput("a limit is 0 or more", code="invalid_limit", field=f"limits.{window}")
    try:
        config = rate_limiting_config(limits)
    except UnsupportedWindow as exc:
        raise InvalidInput(str(exc), code="unknown_window", field="limits") from None
    spec = await typed_connection(store, ask.tenant, ask.connection_id, ("kong", "konnect"))
    async with aclosing(client_for(spec)) as client:
        result = await guarded(enforce_group(client, ask.group, config))
    detail = {"group": ask.group, "config": config, "result": result}
    return await pushed(request, store, ask.tenant, ask.connection_id, "kong.enforce_group", detail)


# --- the seed's Konnect paths: thin aliases over the connection endpoints -----------

KONNECT_DEFAULT_ID = "konnect"
_KONNECT_LISTS = {
    "services": "/services",
    "routes": "/routes",
    "consumers": "/consumers",
    "consumer-groups": "/consumer_groups",
}


def konnect_list(kind: str) -> Any:
    """``GET /integrations/konnect/{services,routes,consumers,consumer-groups}``: the
    control plane's objects, every page (one route per list, so any other path under
    /integrations/konnect/ is a plain 404 or 405)."""

    async def endpoint(request: Request) -> Response:
        tenant = tenant_param(request)
        connection_id = check_id(
            request.query_params.get("connection_id", KONNECT_DEFAULT_ID), CONNECTION_ID_RE, "connection_id"
        )
        _, store = await postgres(request)
        async with aclosing(
            client_for(await typed_connection(store, tenant, connection_id, ("konnect",)))
        ) as client:
            items = await guarded(client.walk(_KONNECT_LISTS[kind]))
        return json_response({"data": items})

    return endpoint


def _seed_status(status: ConsumerStatus) -> Any:
    """The seed's ``POST /integrations/kong/{suspend,resume}`` (``{consumer_id, tenant,
    reason}``): the admin API's status change, pushed to Kong where the connection says so."""

    async def endpoint(request: Request) -> Response:
        change = decode_into(await admin_body(request), StatusChange)
        return await change_status(request, change.tenant, change.consumer_id, status, change.reason)

    return endpoint


_kong_decoder = msgspec.json.Decoder(KongPayload)


async def ingest(request: Request) -> Response:
    """``POST /integrations/kong/ingest``: Kong's HTTP Log plugin payloads (one log or an
    array), as usage events."""
    tenant = ingest_tenant(request)
    settings = request.app.state.settings
    payload = decode(await read_body(request, settings.ingest_max_body_bytes), _kong_decoder)
    logs = payload if isinstance(payload, list) else [payload]
    if len(logs) > settings.ingest_max_events:
        raise ApiError(413, "batch_too_large", f"a batch holds at most {settings.ingest_max_events} logs")
    allowed = frozenset(settings.ingest_header_allowlist)
    events = []
    for index, log in enumerate(logs):
        try:
            events.append(
                kong_log_event(
                    log, tenant=tenant, consumer_field=settings.kong_consumer_field, allowed_headers=allowed
                )
            )
        except InvalidInput as exc:
            if isinstance(payload, list):
                exc.field = f"[{index}].{exc.field}" if exc.field else f"[{index}]"
                exc.message = f"log {index}: {exc.message}"
            raise
    stored = await store_events(request, events)
    body = {"accepted": sum(stored), "duplicates": len(stored) - sum(stored)}
    return json_response(body, 202)


ROUTES = [
    Route("/integrations/kong/ingest", ingest, methods=["POST"]),
    Route("/integrations/kong/suspend", _seed_status(ConsumerStatus.SUSPENDED), methods=["POST"]),
    Route("/integrations/kong/resume", _seed_status(ConsumerStatus.ACTIVE), methods=["POST"]),
    Route("/integrations/kong/enforce/groups", enforce_groups, methods=["POST"]),
    Route("/integrations/kong/health", health_of("kong"), methods=["GET"]),
    Route("/integrations/konnect/health", health_of("konnect"), methods=["GET"]),
    Route(
        "/integrations/konnect/connection", seed_connection("konnect", KONNECT_DEFAULT_ID), methods=["POST"]
    ),
    Route(
        "/integrations/konnect/connection/test",
        for_connection(connections.check_connection, KONNECT_DEFAULT_ID),
        methods=["GET"],
    ),
    *(Route(f"/integrations/konnect/{kind}", konnect_list(kind), methods=["GET"]) for kind in _KONNECT_LISTS),
    Route(
        "/integrations/konnect/runtime/preview",
        for_connection(connections.preview_import, KONNECT_DEFAULT_ID),
        methods=["POST"],
    ),
    Route(
        "/integrations/konnect/runtime/apply",
        for_connection(connections.apply_import, KONNECT_DEFAULT_ID),
        methods=["POST"],
    ),
]
