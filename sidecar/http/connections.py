"""Gateway connections over the admin API: create, read (secrets redacted), delete,
test, and the catalog import (preview, apply). Postgres-backed: without it, 501
``postgres_required``."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sidecar.core.errors import InvalidInput, NotFound
from sidecar.core.models import check_id
from sidecar.http.admin import _actor, _admin_body, _json, _record, _tenant, require_admin
from sidecar.http.bodies import decode_into
from sidecar.http.errors import ApiError
from sidecar.integrations import catalog_import
from sidecar.integrations.connection_store import ConnectionStore, EncryptionKeyMissing
from sidecar.integrations.connections import CONNECTION_ID_RE, ConnectionSpec
from sidecar.integrations.gateway_http import GatewayError
from sidecar.integrations.secret_box import SecretBox, SecretBoxError
from sidecar.reconciler.catalog import PostgresCatalog

TEST_BUDGET_S = 5.0


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
    except catalog_import.NotSupported as exc:
        raise ApiError(501, "not_implemented", str(exc)) from None
    except GatewayError as exc:
        raise ApiError(502, f"gateway_{exc.code}", exc.message) from None


async def put_connection(request: Request) -> Response:
    body = await _admin_body(request)
    connection_id = _connection_id(request)
    spec = decode_into(body, ConnectionSpec).validated()
    _, store = await postgres(request)
    view, created = await guarded(store.put(connection_id, spec, _actor(request)))
    _record(request, "connection.put", spec.tenant, connection_id, type=spec.type)
    return _json(view, 201 if created else 200)


async def get_connection(request: Request) -> Response:
    require_admin(request)
    connection_id = _connection_id(request)
    _, store = await postgres(request)
    view = await store.get(_tenant(request), connection_id)
    if view is None:
        raise NotFound(f"connection {connection_id!r} does not exist", code="connection_not_found")
    return _json(view)


async def list_connections(request: Request) -> Response:
    require_admin(request)
    _, store = await postgres(request)
    return _json({"items": await store.list(_tenant(request))})


async def delete_connection(request: Request) -> Response:
    require_admin(request)
    tenant, connection_id = _tenant(request), _connection_id(request)
    _, store = await postgres(request)
    if not await store.delete(tenant, connection_id, _actor(request)):
        raise NotFound(f"connection {connection_id!r} does not exist", code="connection_not_found")
    _record(request, "connection.delete", tenant, connection_id)
    return _json({"deleted": True, "tenant": tenant, "id": connection_id})


async def check_connection(request: Request) -> Response:
    require_admin(request)
    tenant, connection_id = _tenant(request), _connection_id(request)
    _, store = await postgres(request)
    try:
        async with asyncio.timeout(TEST_BUDGET_S):
            answer = await guarded(catalog_import.check_connection(store, tenant, connection_id))
    except TimeoutError:
        answer = {"ok": False, "error": "timeout", "message": f"no answer within {TEST_BUDGET_S:g} s"}
    return _json(answer)


async def preview_import(request: Request) -> Response:
    require_admin(request)
    tenant, connection_id = _tenant(request), _connection_id(request)
    catalog, store = await postgres(request)
    ledger = await catalog.ledger()
    return _json(await guarded(catalog_import.preview(store, ledger, tenant, connection_id)))


async def apply_import(request: Request) -> Response:
    body = await _admin_body(request)
    ask = decode_into(body, ApplyRequest)
    tenant = ask.tenant or _tenant(request)
    connection_id = _connection_id(request)
    if not ask.token:
        raise InvalidInput("token is required: the token of the preview to apply", field="token")
    catalog, store = await postgres(request)
    ledger = await catalog.ledger()
    applied = await guarded(catalog_import.apply(store, ledger, catalog, tenant, connection_id, ask.token))
    _record(request, "connection.apply", tenant, connection_id, **applied.counts)
    return _json(applied)


ROUTES = [
    Route("/v1/admin/connections", list_connections, methods=["GET"]),
    Route("/v1/admin/connections/{connection_id}", put_connection, methods=["PUT"]),
    Route("/v1/admin/connections/{connection_id}", get_connection, methods=["GET"]),
    Route("/v1/admin/connections/{connection_id}", delete_connection, methods=["DELETE"]),
    Route("/v1/admin/connections/{connection_id}/test", check_connection, methods=["POST"]),
    Route("/v1/admin/connections/{connection_id}/preview", preview_import, methods=["POST"]),
    Route("/v1/admin/connections/{connection_id}/apply", apply_import, methods=["POST"]),
]
