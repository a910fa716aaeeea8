"""API key introspection (the platform's consumer-access contract, after RFC 7662):
what a raw API key stands for, without counting or charging anything.

    POST /internal/api-keys/introspect     {"apiKey": "...", "tenant": "default"}
    POST /v1/api-keys/introspect           the same

A live key answers ``{"active": true, ...}`` with its consumer's context (tenant,
consumer, status, plan, wallet mode, the key's hash, registration time, expiry and
scopes); an unknown, expired or revoked key, or one whose consumer is gone, answers 200
``{"active": false}`` and
nothing else, as token introspection does. Only reads: no window, wallet or usage
record moves. For the ``gateway`` and ``admin`` roles (http/access.py), each caller (a
token) at most ``introspect_per_second`` calls a second (429 ``rate_limited`` past it).
"""

from __future__ import annotations

import time

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sidecar.core.api_keys import hash_api_key
from sidecar.core.clock import iso_utc, now_ms
from sidecar.core.errors import InvalidInput
from sidecar.core.models import DEFAULT_TENANT, TENANT_RE, check_id
from sidecar.http.access import principal, scope
from sidecar.http.admin_request import admin_body, json_response
from sidecar.http.bodies import decode_into
from sidecar.http.errors import ApiError


class Inactive(msgspec.Struct):
    """An unknown, expired or revoked key, or one whose consumer is gone: nothing else."""

    active: bool = False


_INACTIVE = Inactive()


class IntrospectRequest(msgspec.Struct, forbid_unknown_fields=True):
    apiKey: str
    tenant: str = DEFAULT_TENANT


class Introspection(msgspec.Struct):
    active: bool
    tenant: str
    consumer_id: str
    status: str
    plan_id: str
    wallet_mode: str
    key_hash: str
    key_created_at: str | None  # ISO 8601 UTC; None: registered before the sidecar kept it
    key_expires_at: str | None  # None: never
    scopes: tuple[str, ...]  # empty: every product of the plan


class PerSecond:
    """Calls per caller within the current second."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.second = 0
        self.counts: dict[str, int] = {}

    def take(self, caller: str) -> bool:
        second = int(time.monotonic())
        if second != self.second:
            self.second, self.counts = second, {}
        count = self.counts.get(caller, 0) + 1
        self.counts[caller] = count
        return count <= self.limit


async def introspect(request: Request) -> Response:
    limiter: PerSecond = request.app.state.introspection_limit
    if not limiter.take(principal(request).actor):
        message = f"at most {limiter.limit} introspections a second per caller"
        raise ApiError(429, "rate_limited", message, headers={"Retry-After": "1"})
    ask = decode_into(await admin_body(request), IntrospectRequest)
    scope(request, check_id(ask.tenant, TENANT_RE, "tenant"))
    if not 8 <= len(ask.apiKey) <= 512:
        raise InvalidInput("apiKey must be 8 to 512 characters", code="invalid_key", field="apiKey")
    store = request.app.state.store
    key_hash = hash_api_key(ask.apiKey)
    consumer_id = await store.resolve_key(ask.tenant, key_hash)
    if consumer_id is None:
        return json_response(_INACTIVE)
    keys = await store.consumer_keys(ask.tenant, consumer_id)
    key = next((k for k in keys or () if k.key_hash == key_hash), None)
    now = now_ms()
    view = await store.get_consumer(ask.tenant, consumer_id, now)
    if key is None or view is None:  # revoked, or its consumer deleted
        return json_response(_INACTIVE)
    if key.expires_ms is not None and now >= key.expires_ms:
        return json_response(_INACTIVE)
    return json_response(
        Introspection(
            active=True,
            tenant=view.tenant,
            consumer_id=view.id,
            status=view.status.value,
            plan_id=view.plan_id,
            wallet_mode=view.wallet_mode.value,
            key_hash=key_hash,
            key_created_at=iso_utc(key.created_ms),
            key_expires_at=iso_utc(key.expires_ms),
            scopes=key.scopes,
        )
    )


ROUTES = [
    Route("/internal/api-keys/introspect", introspect, methods=["POST"]),
    Route("/v1/api-keys/introspect", introspect, methods=["POST"]),
]
