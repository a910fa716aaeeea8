"""Gateway connections over the admin API: create, read (secrets redacted), delete,
test, and the catalog import (preview, apply). Postgres-backed: without it, 501
``postgres_required``."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sidecar.core.errors import InvalidInput, NotFound
from sidecar.core.models import check_id
from sidecar.http.access import scope
from sidecar.http.admin_request import actor, admin_body, json_response, record, tenant_param
from sidecar.http.bodies import decode, decode_into, invalid_from
from sidecar.http.errors import ApiError
from sidecar.integrations import catalog_import
from sidecar.integrations.catalog_import import GATEWAYS
from sidecar.integrations.connection_store import ConnectionStore, EncryptionKeyMissing
from sidecar.integrations.connections import CONNECTION_ID_RE, ConnectionSpec, ConnectionView, SyncResult
from sidecar.integrations.gateway_http import GatewayError
from sidecar.integrations.secret_box import SecretBox, SecretBoxError
from sidecar.reconciler.catalog import PostgresCatalog

TEST_BUDGET_S = 5.0
PUSH_BUDGET_S = 5.0
log = logging.getLogger("aforo.connections")


class ApplyRequest(msgspec.Struct, forbid_unknown_fields=True):
    token: str
    tenant: str | None = None


async def postgres(request: Request) -> tuple[PostgresCatalog, ConnectionStore]:
    catalog = request.app.state.catalog
    if not isinstance(catalog, PostgresCatalog):
        raise ApiError(501, "postgres_required", "connections are kept in Postgres: set AFORO_DATABASE_URL")
    ledger = await catalog.ledger()
    settings = request.app.state.settings
    box = SecretBox(settings.secret_keys) if settings.secret_keys else None
    return catalog, ConnectionStore(ledger.pool, box)


def _connection_id(request: Request) -> str:
    return check_id(request.path_params["connection_id"], CONNECTION_ID_RE, "connection_id")


async def guarded(work: Any) -> Any:
    """The errors of connection work, as API errors."""
    try:
        return await work
    except EncryptionKeyMissing as exc:
        raise ApiError(501, "secret_keys_required", str(exc)) from None
    except SecretBoxError as exc:
        raise ApiError(503, "secret_unavailable", str(exc)) from None
    except GatewayError as exc:
        raise ApiError(502, f"gateway_{exc.code}", exc.message) from None


async def put_connection(request: Request) -> Response:
    body = await admin_body(request)
    connection_id = _connection_id(request)
    return await _saved(request, connection_id, decode_into(body, ConnectionSpec).validated())


async def _saved(request: Request, connection_id: str, spec: ConnectionSpec) -> Response:
    """Store a validated connection: 201 created, 200 replaced."""
    scope(request, spec.tenant)
    _, store = await postgres(request)
    view, created = await guarded(store.put(connection_id, spec, actor(request)))
    record(request, "connection.put", spec.tenant, connection_id, type=spec.type)
    return json_response(view, 201 if created else 200)


async def get_connection(request: Request) -> Response:
    connection_id = _connection_id(request)
    _, store = await postgres(request)
    view = await store.get(tenant_param(request), connection_id)
    if view is None:
        raise NotFound(f"connection {connection_id!r} does not exist", code="connection_not_found")
    return json_response(view)


async def list_connections(request: Request) -> Response:
    _, store = await postgres(request)
    return json_response({"items": await store.list(tenant_param(request))})


async def delete_connection(request: Request) -> Response:
    tenant, connection_id = tenant_param(request), _connection_id(request)
    _, store = await postgres(request)
    if not await store.delete(tenant, connection_id, actor(request)):
        raise NotFound(f"connection {connection_id!r} does not exist", code="connection_not_found")
    record(request, "connection.delete", tenant, connection_id)
    return json_response({"deleted": True, "tenant": tenant, "id": connection_id})


async def check_connection(request: Request) -> Response:
    tenant, connection_id = tenant_param(request), _connection_id(request)
    _, store = await postgres(request)
    try:
        async with asyncio.timeout(TEST_BUDGET_S):
            answer = await guarded(catalog_import.check_connection(store, tenant, connection_id))
    except TimeoutError:
        answer = {"ok": False, "error": "timeout", "message": f"no answer within {TEST_BUDGET_S:g} s"}
    return json_response(answer)


async def preview_import(request: Request) -> Response:
    tenant, connection_id = tenant_param(request), _connection_id(request)
    catalog, store = await postgres(request)
    ledger = await catalog.ledger()
    return json_response(await guarded(catalog_import.preview(store, ledger, tenant, connection_id)))


async def apply_import(request: Request) -> Response:
    body = await admin_body(request)
    ask = decode_into(body, ApplyRequest)
    tenant = scope(request, ask.tenant) if ask.tenant else tenant_param(request)
    connection_id = _connection_id(request)
    if not ask.token:
        raise InvalidInput("token is required: the token of the preview to apply", field="token")
    catalog, store = await postgres(request)
    ledger = await catalog.ledger()
    applied = await guarded(catalog_import.apply(store, ledger, catalog, tenant, connection_id, ask.token))
    record(request, "connection.apply", tenant, connection_id, **applied.counts)
    return json_response(applied)


# --- what the gateways' own routes share ------------------------------------------

_object_decoder = msgspec.json.Decoder(dict[str, Any])


async def typed_connection(
    store: ConnectionStore, tenant: str, connection_id: str, types: tuple[str, ...]
) -> ConnectionSpec:
    """The connection, if it is of one of ``types``; 404 ``connection_not_found`` else."""
    spec = await guarded(store.load(tenant, connection_id))
    if spec is None or spec.type not in types:
        raise NotFound(f"{types[0]} connection {connection_id!r} does not exist", code="connection_not_found")
    return spec


def seed_connection(kind: str, default_id: str) -> Any:
    """A seed path that creates a ``kind`` connection: ``connection_id`` in the body
    (default ``default_id``), the rest as for PUT /v1/admin/connections/{id}."""

    async def create(request: Request) -> Response:
        raw = decode(await admin_body(request), _object_decoder)
        connection_id = check_id(raw.pop("connection_id", default_id), CONNECTION_ID_RE, "connection_id")
        if raw.get("type", kind) != kind:
            raise InvalidInput(f"this path creates {kind} connections", field="type")
        try:
            spec = msgspec.convert({**raw, "type": kind}, ConnectionSpec)
        except msgspec.ValidationError as exc:
            raise invalid_from(exc) from None
        return await _saved(request, connection_id, spec.validated())

    return create


def for_connection(handler: Any, default_id: str) -> Any:
    """``handler`` of /v1/admin/connections/{connection_id}/..., for the connection named
    by ``?connection_id=`` (default ``default_id``)."""

    async def alias(request: Request) -> Response:
        request.scope["path_params"] = {
            "connection_id": request.query_params.get("connection_id", default_id)
        }
        return await handler(request)

    return alias


async def pushed(
    request: Request,
    store: ConnectionStore,
    tenant: str,
    connection_id: str,
    action: str,
    detail: dict[str, Any],
) -> Response:
    """The answer to a push to a gateway (``detail["result"]``: created, updated or
    unchanged), audited when it changed the gateway (an unchanged one wrote nothing)."""
    if detail["result"] != "unchanged":
        await store.audit_push(tenant, connection_id, actor(request), action, detail)
    record(request, action, tenant, connection_id, result=detail["result"])
    return json_response(detail)


class StatusPush(msgspec.Struct, omit_defaults=True):
    """What pushing a consumer's status to one gateway did."""

    connection_id: str
    type: str
    result: str | None = None  # updated | unchanged
    error: str | None = None  # the gateway error code when the push failed


async def push_status(request: Request, tenant: str, consumer_id: str, active: bool) -> list[StatusPush]:
    """Push a consumer's status to every gateway whose import brought it in and whose
    connection says ``push_status``. The sidecar's own status is already written (the
    truth): a gateway that fails is reported and logged, and the next push or an
    operator fixes it (each push is idempotent)."""
    if not isinstance(request.app.state.catalog, PostgresCatalog):
        return []
    _, store = await postgres(request)
    pushes = []
    for connection_id in await store.owners(tenant, "consumer", consumer_id):
        spec = None
        try:
            spec = await store.load(tenant, connection_id)
            if spec is None or not spec.pushes_status():
                continue
            # Bounded: the admin call answers within PUSH_BUDGET_S per gateway, whatever
            # the gateway's retries would have waited.
            async with asyncio.timeout(PUSH_BUDGET_S):
                result = await GATEWAYS[spec.type].set_status(spec, consumer_id, active)
        except GatewayError as exc:
            error = exc.code
        except SecretBoxError:
            error = "secret_unavailable"
        except TimeoutError:
            error = "timeout"
        else:
            detail = {"consumer_id": consumer_id, "active": active, "result": result}
            if result != "unchanged":
                action = f"{spec.type}.consumer_status"
                await store.audit_push(tenant, connection_id, actor(request), action, detail)
            pushes.append(StatusPush(connection_id, spec.type, result=result))
            continue
        log.warning("status of %s/%s not pushed to %s: %s", tenant, consumer_id, connection_id, error)
        pushes.append(StatusPush(connection_id, spec.type if spec else "?", error=error))
    return pushes


class ConnectionHealth(msgspec.Struct):
    id: str
    type: str
    reachable: bool
    error: str | None  # the gateway error code when not reachable
    # What the gateway says of itself: Kong's database_reachable (GET /status), the
    # Konnect control plane's name, Apigee's organization runtimeType.
    gateway: dict[str, Any]
    last_sync: SyncResult | None
    next_sync_at: str | None  # None: never imported, so not synced periodically


class Health(msgspec.Struct):
    tenant: str
    connections: list[ConnectionHealth]
    reconciler_alive: bool  # its heartbeat is younger than HEARTBEAT_STALE_S
    reconciler_last_seen: str | None
    streams_waiting: int  # usage, event and notice streams marked for the next drain


HEARTBEAT_STALE_S = 15.0


async def _connection_health(store: ConnectionStore, view: ConnectionView) -> ConnectionHealth:
    spec = await guarded(store.load(view.tenant, view.id))
    if spec is None:  # deleted meanwhile
        reachable, error, details = False, "not_found", {}
    else:
        reachable, error, details = await catalog_import.GATEWAYS[spec.type].reach(spec)
    next_at = None
    if view.last_sync is not None and await store.imported(view.tenant, view.id):
        last = datetime.fromisoformat(view.last_sync.at)
        next_at = (last + timedelta(seconds=view.sync_interval_seconds)).isoformat()
    return ConnectionHealth(view.id, view.type, reachable, error, details, view.last_sync, next_at)


def health_of(*types: str) -> Any:
    """The health of a gateway's connections (of ``types``) in the tenant: reachable now,
    the last sync's time and result, the next sync; the reconciler's heartbeat and the
    drain backlog."""

    async def health(request: Request) -> Response:
        tenant = tenant_param(request)
        _, store = await postgres(request)
        views = [v for v in await store.list(tenant) if v.type in types]
        connections = list(await asyncio.gather(*(_connection_health(store, v) for v in views)))
        beat, waiting = await request.app.state.store.health()
        now = datetime.now(tz=UTC).timestamp() * 1000
        alive = beat is not None and now - beat < HEARTBEAT_STALE_S * 1000
        last_seen = None if beat is None else datetime.fromtimestamp(beat / 1000, tz=UTC).isoformat()
        return json_response(Health(tenant, connections, alive, last_seen, waiting))

    return health


ROUTES = [
    Route("/v1/admin/connections", list_connections, methods=["GET"]),
    Route("/v1/admin/connections/{connection_id}", put_connection, methods=["PUT"]),
    Route("/v1/admin/connections/{connection_id}", get_connection, methods=["GET"]),
    Route("/v1/admin/connections/{connection_id}", delete_connection, methods=["DELETE"]),
    Route("/v1/admin/connections/{connection_id}/test", check_connection, methods=["POST"]),
    Route("/v1/admin/connections/{connection_id}/preview", preview_import, methods=["POST"]),
    Route("/v1/admin/connections/{connection_id}/apply", apply_import, methods=["POST"]),
]
