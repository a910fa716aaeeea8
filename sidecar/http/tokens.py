"""API tokens: mint (the raw token shown once), list, read, revoke, rotate.

    POST   /v1/admin/tokens                  {"tenant", "role", "name", "consumers", "expires_in_seconds"}
    GET    /v1/admin/tokens?tenant=
    GET    /v1/admin/tokens/{id}?tenant=
    DELETE /v1/admin/tokens/{id}?tenant=     revoke (kept, listed as revoked)
    POST   /v1/admin/tokens/{id}/rotate?tenant=   {"grace_seconds"}: a new secret; the old
                                             one stays valid for the grace period

An admin token manages its own tenant's tokens; the bootstrap admin token any tenant's.
"""

from __future__ import annotations

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sidecar.core.access import (
    TOKEN_ID_RE,
    ApiToken,
    Role,
    RotateRequest,
    TokenRequest,
    new_secret,
    new_token_id,
    raw_token,
    secret_hash,
    view,
)
from sidecar.core.clock import now_ms
from sidecar.core.errors import NotFound
from sidecar.core.models import check_id
from sidecar.http.access import scope
from sidecar.http.admin_request import actor, admin_body, json_response, record, tenant_param
from sidecar.http.bodies import decode_into

_SHOWN_ONCE = "the raw token is shown only now; the sidecar keeps the SHA-256 of its secret"


async def _held(request: Request) -> ApiToken:
    """The token the path names, in the tenant the caller may see (404 otherwise)."""
    tenant = tenant_param(request)
    token_id = check_id(request.path_params["token_id"], TOKEN_ID_RE, "token_id")
    token = await request.app.state.catalog.get_token(token_id)
    if token is None or token.tenant != tenant:
        raise NotFound(f"token {token_id!r} does not exist", code="token_not_found")
    return token


async def create_token(request: Request) -> Response:
    ask = decode_into(await admin_body(request), TokenRequest).validated()
    scope(request, ask.tenant)
    now = now_ms()
    secret = new_secret()
    token = ApiToken(
        id=new_token_id(),
        tenant=ask.tenant,
        role=Role(ask.role),
        name=ask.name,
        secret_hash=secret_hash(secret),
        created_ms=now,
        created_by=actor(request),
        consumers=sorted(set(ask.consumers)),
        expires_ms=None if ask.expires_in_seconds is None else now + ask.expires_in_seconds * 1000,
    )
    await request.app.state.catalog.put_token(token, "token.create", actor(request))
    record(request, "token.create", token.tenant, token.id, role=token.role.value, name=token.name)
    shown = msgspec.structs.asdict(view(token))
    return json_response({**shown, "token": raw_token(token.id, secret), "note": _SHOWN_ONCE}, 201)


async def list_tokens(request: Request) -> Response:
    tokens = await request.app.state.catalog.list_tokens(tenant_param(request))
    return json_response({"items": [view(t) for t in tokens]})


async def get_token(request: Request) -> Response:
    return json_response(view(await _held(request)))


async def revoke_token(request: Request) -> Response:
    token = await _held(request)
    if token.revoked_ms is None:
        token = msgspec.structs.replace(token, revoked_ms=now_ms())
        await request.app.state.catalog.put_token(token, "token.revoke", actor(request))
        request.app.state.authorizer.gateway_tokens.forget(token.id)
        record(request, "token.revoke", token.tenant, token.id)
    return json_response(view(token))


async def rotate_token(request: Request) -> Response:
    body = await admin_body(request)
    ask = decode_into(body, RotateRequest).validated()
    token = await _held(request)
    now = now_ms()
    if token.revoked_ms is not None or (token.expires_ms is not None and now >= token.expires_ms):
        raise NotFound(f"token {token.id!r} is revoked or expired: mint a new one", code="token_not_found")
    secret = new_secret()
    token = msgspec.structs.replace(
        token,
        secret_hash=secret_hash(secret),
        previous_hash=token.secret_hash if ask.grace_seconds else None,
        previous_until_ms=now + ask.grace_seconds * 1000 if ask.grace_seconds else None,
    )
    await request.app.state.catalog.put_token(token, "token.rotate", actor(request))
    request.app.state.authorizer.gateway_tokens.forget(token.id)
    record(request, "token.rotate", token.tenant, token.id, grace_seconds=ask.grace_seconds)
    shown = msgspec.structs.asdict(view(token))
    return json_response({**shown, "token": raw_token(token.id, secret), "note": _SHOWN_ONCE})


ROUTES = [
    Route("/v1/admin/tokens", create_token, methods=["POST"]),
    Route("/v1/admin/tokens", list_tokens, methods=["GET"]),
    Route("/v1/admin/tokens/{token_id}", get_token, methods=["GET"]),
    Route("/v1/admin/tokens/{token_id}", revoke_token, methods=["DELETE"]),
    Route("/v1/admin/tokens/{token_id}/rotate", rotate_token, methods=["POST"]),
]
