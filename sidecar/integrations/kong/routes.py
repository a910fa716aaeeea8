"""Kong-specific routes: native enforcement pushed through a connection's Admin API."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sidecar.core.errors import InvalidInput, NotFound
from sidecar.core.models import DEFAULT_TENANT, PLAN_ID_RE, check_id
from sidecar.core.windows import parse_window
from sidecar.http import connections
from sidecar.http.admin import _actor, _admin_body, _json, _record, _tenant, require_admin
from sidecar.http.bodies import decode, decode_into, invalid_from
from sidecar.http.connections import guarded, postgres
from sidecar.integrations.connection_store import ConnectionStore
from sidecar.integrations.connections import CONNECTION_ID_RE, ConnectionSpec, SyncResult
from sidecar.integrations.gateway_http import GatewayError
from sidecar.integrations.kong.admin_client import enforce_group
from sidecar.integrations.kong.importer import TEST_TIMEOUT_S, client_for
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
    ask = decode_into(await _admin_body(request), EnforceGroup)
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
    spec = await guarded(store.load(ask.tenant, ask.connection_id))
    if spec is None or spec.type not in ("kong", "konnect"):
        raise NotFound(f"kong connection {ask.connection_id!r} does not exist", code="connection_not_found")
    client = client_for(spec)
    try:
        result = await guarded(enforce_group(client, ask.group, config))
    finally:
        await client.close()
    detail = {"group": ask.group, "config": config, "result": result}
    if result != "unchanged":
        await store.audit_push(ask.tenant, ask.connection_id, _actor(request), "kong.enforce_group", detail)
    _record(request, "kong.enforce_group", ask.tenant, ask.connection_id, group=ask.group, result=result)
    return _json(detail)


class ConnectionHealth(msgspec.Struct):
    id: str
    reachable: bool
    error: str | None  # the gateway error code when not reachable
    database_reachable: bool | None  # Kong's own database, from GET /status
    last_sync: SyncResult | None
    next_sync_at: str | None  # None: never imported, so not synced periodically


class Health(msgspec.Struct):
    tenant: str
    connections: list[ConnectionHealth]
    reconciler_alive: bool  # its heartbeat is younger than HEARTBEAT_STALE_S
    reconciler_last_seen: str | None
    streams_waiting: int  # usage, event and notice streams marked for the next drain


HEARTBEAT_STALE_S = 15.0


def _iso_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat()


# Reachable, the error code if not, and whether Kong's own database is (from /status).
Reach = tuple[bool, str | None, bool | None]


async def _reach(spec: ConnectionSpec) -> Reach:
    client = client_for(spec, timeout_s=TEST_TIMEOUT_S, attempts=1)
    try:
        status = await client.status()
    except GatewayError as exc:
        return False, exc.code, None
    finally:
        await client.close()
    database = status.get("database")
    return True, None, database.get("reachable") if isinstance(database, dict) else None


async def health(request: Request) -> Response:
    """Each Kong connection of the tenant: reachable now, its last and next sync; and
    the reconciler's heartbeat and the drain backlog."""
    require_admin(request)
    tenant = _tenant(request)
    _, store = await postgres(request)
    views = [v for v in await store.list(tenant) if v.type == "kong"]
    checks = await asyncio.gather(*(_reach_by_id(store, tenant, v.id) for v in views))
    connections = []
    for view, (reachable, error, database) in zip(views, checks, strict=True):
        next_at = None
        if view.last_sync is not None and await store.imported(tenant, view.id):
            last = datetime.fromisoformat(view.last_sync.at)
            next_at = (last + timedelta(seconds=view.sync_interval_seconds)).isoformat()
        connections.append(ConnectionHealth(view.id, reachable, error, database, view.last_sync, next_at))
    beat, waiting = await request.app.state.store.health()
    now = datetime.now(tz=UTC).timestamp() * 1000
    alive = beat is not None and now - beat < HEARTBEAT_STALE_S * 1000
    return _json(Health(tenant, connections, alive, None if beat is None else _iso_ms(beat), waiting))


async def _reach_by_id(store: ConnectionStore, tenant: str, connection_id: str) -> Reach:
    spec = await guarded(store.load(tenant, connection_id))
    return await _reach(spec) if spec is not None else (False, "not_found", None)


_object_decoder = msgspec.json.Decoder(dict[str, Any])

# --- the seed's Konnect paths: thin aliases over the connection endpoints -----------

KONNECT_DEFAULT_ID = "konnect"
_KONNECT_LISTS = {
    "services": "/services",
    "routes": "/routes",
    "consumers": "/consumers",
    "consumer-groups": "/consumer_groups",
}


def _konnect(handler: Any) -> Any:
    """``handler`` of /v1/admin/connections/{connection_id}/..., for the connection named
    by ``?connection_id=`` (default "konnect")."""

    async def alias(request: Request) -> Response:
        request.scope["path_params"] = {
            "connection_id": request.query_params.get("connection_id", KONNECT_DEFAULT_ID)
        }
        return await handler(request)

    return alias


async def konnect_connection(request: Request) -> Response:
    """The seed's ``POST /integrations/konnect/connection``: a ``konnect`` connection,
    ``connection_id`` in the body (default "konnect"), the rest as for PUT."""
    raw = decode(await _admin_body(request), _object_decoder)
    connection_id = check_id(raw.pop("connection_id", KONNECT_DEFAULT_ID), CONNECTION_ID_RE, "connection_id")
    if raw.get("type", "konnect") != "konnect":
        raise InvalidInput("this path creates konnect connections", field="type")
    try:
        spec = msgspec.convert({**raw, "type": "konnect"}, ConnectionSpec).validated()
    except msgspec.ValidationError as exc:
        raise invalid_from(exc) from None
    _, store = await postgres(request)
    view, created = await guarded(store.put(connection_id, spec, _actor(request)))
    _record(request, "connection.put", spec.tenant, connection_id, type=spec.type)
    return _json(view, 201 if created else 200)


async def konnect_list(request: Request) -> Response:
    """``GET /integrations/konnect/{services,routes,consumers,consumer-groups}``: the
    control plane's objects, every page."""
    require_admin(request)
    kind = request.path_params["kind"]
    if kind not in _KONNECT_LISTS:
        raise NotFound(f"no such list {kind!r} (one of {', '.join(_KONNECT_LISTS)})", code="not_found")
    tenant = _tenant(request)
    connection_id = check_id(
        request.query_params.get("connection_id", KONNECT_DEFAULT_ID), CONNECTION_ID_RE, "connection_id"
    )
    _, store = await postgres(request)
    spec = await guarded(store.load(tenant, connection_id))
    if spec is None or spec.type != "konnect":
        raise NotFound(f"konnect connection {connection_id!r} does not exist", code="connection_not_found")
    client = client_for(spec)
    try:
        items = await guarded(client.walk(_KONNECT_LISTS[kind]))
    finally:
        await client.close()
    return _json({"data": items})


ROUTES = [
    Route("/integrations/kong/enforce/groups", enforce_groups, methods=["POST"]),
    Route("/integrations/kong/health", health, methods=["GET"]),
    Route("/integrations/konnect/connection", konnect_connection, methods=["POST"]),
    Route("/integrations/konnect/connection/test", _konnect(connections.check_connection), methods=["GET"]),
    Route(
        "/integrations/konnect/{kind:str}",
        konnect_list,
        methods=["GET"],
    ),
    Route("/integrations/konnect/runtime/preview", _konnect(connections.preview_import), methods=["POST"]),
    Route("/integrations/konnect/runtime/apply", _konnect(connections.apply_import), methods=["POST"]),
]
