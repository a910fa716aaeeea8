"""Who may call which endpoint: one table, and the authentication it drives.

``ACCESS`` names, for every route of the app, the roles a bearer token needs
(sidecar/core/access.py), or that the route takes no token (``OPEN``: decisions, usage,
probes) or its own shared secret (``INGEST_SECRET``: gateway log ingestion). ``protect``
wraps every route with the check its row says, before the endpoint reads a byte of the
body; ``create_app`` refuses to start with a route the table does not name, and the
README's table is checked against this one (tests/test_access.py).

Authentication: ``Authorization: Bearer <token>`` where the token is an API token
(``aft_...``, looked up by id, its secret compared constant-time) or the environment's
admin token (the bootstrap super-admin). A source address's failures are counted until
``FAILURE_WINDOW_S`` pass without one; at ``auth_failure_limit`` it gets 429 before any lookup
(so a guessing client costs neither Redis nor Postgres) until that much time has passed.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Sequence

from cachetools import TTLCache
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from sidecar import metrics
from sidecar.core.access import (
    ADMIN,
    BILLING,
    BOOTSTRAP,
    GATEWAY_OR_ADMIN,
    READ,
    READ_CONSUMERS,
    TOKEN_PREFIX,
    Principal,
    Role,
    parse_raw,
    principal_of,
    secret_matches,
    usable,
)
from sidecar.core.clock import now_ms
from sidecar.core.errors import NotFound
from sidecar.http.errors import ApiError

OPEN = "open"  # no token: the probes
# No admin token; a gateway token of the call's tenant when require_gateway_token is on
# (checked by the endpoint itself, which knows the tenant: sidecar/gateway_tokens.py).
GATEWAY = "gateway token when required"
INGEST_SECRET = "ingest-secret"  # the tenant's ingestion shared secret (http/ingest.py)
Rule = frozenset[Role] | str

_GET, _PUT, _POST, _DELETE = "GET", "PUT", "POST", "DELETE"

# (method, path) -> who may call it. One row per route of the app.
ACCESS: dict[tuple[str, str], Rule] = {
    (_POST, "/v1/authorize"): GATEWAY,
    (_POST, "/integrations/apigee/authorize"): GATEWAY,
    (_POST, "/v1/usage"): GATEWAY,
    (_GET, "/healthz"): OPEN,
    (_GET, "/readyz"): OPEN,
    (_GET, "/metrics"): OPEN,
    (_GET, "/openapi.json"): OPEN,
    (_GET, "/docs"): OPEN,
    (_GET, "/docs/docs.js"): OPEN,
    (_GET, "/docs/docs.css"): OPEN,
    (_POST, "/internal/api-keys/introspect"): GATEWAY_OR_ADMIN,
    (_POST, "/v1/api-keys/introspect"): GATEWAY_OR_ADMIN,
    (_POST, "/integrations/kong/ingest"): INGEST_SECRET,
    (_POST, "/integrations/apigee/ingest"): INGEST_SECRET,
    # API tokens
    (_POST, "/v1/admin/tokens"): ADMIN,
    (_GET, "/v1/admin/tokens"): ADMIN,
    (_GET, "/v1/admin/tokens/{token_id}"): ADMIN,
    (_DELETE, "/v1/admin/tokens/{token_id}"): ADMIN,
    (_POST, "/v1/admin/tokens/{token_id}/rotate"): ADMIN,
    # plans
    (_GET, "/v1/admin/plans"): READ,
    (_GET, "/v1/admin/plans/{plan_id}"): READ,
    (_PUT, "/v1/admin/plans/{plan_id}"): ADMIN,
    (_DELETE, "/v1/admin/plans/{plan_id}"): ADMIN,
    # consumers, wallets, keys
    (_GET, "/v1/usage/consumers/{consumer_id}/current"): READ_CONSUMERS,
    (_GET, "/v1/usage/summary"): READ_CONSUMERS,
    (_GET, "/v1/admin/consumers"): READ_CONSUMERS,
    (_GET, "/v1/admin/consumers/{consumer_id}"): READ_CONSUMERS,
    (_GET, "/v1/admin/consumers/{consumer_id}/wallet-notices"): READ_CONSUMERS,
    (_GET, "/v1/admin/consumers/{consumer_id}/keys"): READ,
    (_PUT, "/v1/admin/consumers/{consumer_id}"): ADMIN,
    (_DELETE, "/v1/admin/consumers/{consumer_id}"): ADMIN,
    (_POST, "/v1/admin/consumers/{consumer_id}/suspend"): BILLING,
    (_POST, "/v1/admin/consumers/{consumer_id}/resume"): BILLING,
    (_POST, "/v1/admin/consumers/{consumer_id}/revoke"): BILLING,
    (_POST, "/v1/admin/consumers/{consumer_id}/topup"): BILLING,
    (_POST, "/v1/admin/consumers/{consumer_id}/keys"): ADMIN,
    (_DELETE, "/v1/admin/consumers/{consumer_id}/keys/{key_hash}"): ADMIN,
    (_GET, "/v1/admin/reconciliation"): READ,
    (_POST, "/v1/admin/reconciliation/gateway"): BILLING,
    # gateway connections and imports
    (_GET, "/v1/admin/connections"): READ,
    (_GET, "/v1/admin/connections/{connection_id}"): READ,
    (_PUT, "/v1/admin/connections/{connection_id}"): ADMIN,
    (_DELETE, "/v1/admin/connections/{connection_id}"): ADMIN,
    (_POST, "/v1/admin/connections/{connection_id}/test"): ADMIN,
    (_POST, "/v1/admin/connections/{connection_id}/preview"): ADMIN,
    (_POST, "/v1/admin/connections/{connection_id}/apply"): ADMIN,
    # alerts and their webhooks
    (_GET, "/v1/admin/alerts"): READ,
    (_GET, "/v1/admin/alert-rules"): READ,
    (_PUT, "/v1/admin/alert-rules"): BILLING,
    (_GET, "/v1/admin/webhooks"): READ,
    (_GET, "/v1/admin/webhooks/{webhook_id}"): READ,
    (_PUT, "/v1/admin/webhooks/{webhook_id}"): BILLING,
    (_DELETE, "/v1/admin/webhooks/{webhook_id}"): BILLING,
    (_POST, "/v1/admin/webhooks/{webhook_id}/secret"): BILLING,
    (_GET, "/v1/admin/webhooks/{webhook_id}/deliveries"): READ,
    (_POST, "/v1/admin/webhooks/{webhook_id}/deliveries/{delivery_id}/redeliver"): BILLING,
    (_POST, "/integrations/kong/suspend"): BILLING,
    (_POST, "/integrations/kong/resume"): BILLING,
    (_POST, "/integrations/kong/enforce/groups"): ADMIN,
    (_GET, "/integrations/kong/health"): READ,
    (_GET, "/integrations/konnect/health"): READ,
    (_POST, "/integrations/konnect/connection"): ADMIN,
    (_GET, "/integrations/konnect/connection/test"): ADMIN,
    (_GET, "/integrations/konnect/services"): ADMIN,
    (_GET, "/integrations/konnect/routes"): ADMIN,
    (_GET, "/integrations/konnect/consumers"): ADMIN,
    (_GET, "/integrations/konnect/consumer-groups"): ADMIN,
    (_POST, "/integrations/konnect/runtime/preview"): ADMIN,
    (_POST, "/integrations/konnect/runtime/apply"): ADMIN,
    (_POST, "/integrations/apigee/suspend"): BILLING,
    (_POST, "/integrations/apigee/resume"): BILLING,
    (_POST, "/integrations/apigee/connect"): ADMIN,
    (_POST, "/integrations/apigee/catalog/sync"): ADMIN,
    (_POST, "/integrations/apigee/enforce/quotas"): ADMIN,
    (_GET, "/integrations/apigee/health"): READ,
}

# A source address's failed authentications (the auth_failure_limit setting, default 20),
# each within this many seconds of the one before; then 429 until that much time passes.
FAILURE_WINDOW_S = 60
# A token's last use is written at most this often per process (not on every call).
TOUCH_EVERY_MS = 60_000
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="aforo"'}


def describe(rule: Rule) -> str:
    """How the README's table names a rule."""
    if isinstance(rule, str):
        return rule
    return ", ".join(role.value for role in Role if role in rule)


class Gate:
    """Authentication state of one app: failures per source address, last touches."""

    def __init__(self, max_failures: int) -> None:
        self.max_failures = max_failures
        self.failures: TTLCache[str, int] = TTLCache(maxsize=100_000, ttl=FAILURE_WINDOW_S)
        self.touched: TTLCache[str, int] = TTLCache(maxsize=100_000, ttl=TOUCH_EVERY_MS / 1000)

    def _failed(self, source: str, reason: str) -> None:
        metrics.AUTH_FAILURES.labels(reason).inc()
        self.failures[source] = self.failures.get(source, 0) + 1

    async def authenticate(self, request: Request) -> Principal:
        source = request.client.host if request.client else "-"
        if self.failures.get(source, 0) >= self.max_failures:
            metrics.AUTH_FAILURES.labels("rate_limited").inc()
            raise ApiError(
                429,
                "too_many_auth_failures",
                f"more than {self.max_failures} failed authentications from this address; "
                f"try again within {FAILURE_WINDOW_S} s",
                headers={"Retry-After": str(FAILURE_WINDOW_S)},
            )
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        given = given.strip()
        bearer = scheme.lower() == "bearer" and bool(given)
        if bearer and given.startswith(TOKEN_PREFIX):
            return await self._token(request, source, given)
        expected: str | None = request.app.state.settings.admin_token
        if not bearer and expected is not None:
            self._failed(source, "missing")
            raise ApiError(401, "unauthorized", "missing bearer token", headers=_CHALLENGE)
        if expected is None:
            self._failed(source, "admin_disabled")
            raise ApiError(
                401,
                "admin_disabled",
                "no admin token is configured (AFORO_ADMIN_TOKEN, --admin-token): use an API token",
                headers=_CHALLENGE,
            )
        if not hmac.compare_digest(given.encode(), expected.encode()):
            self._failed(source, "invalid")
            raise ApiError(401, "unauthorized", "invalid bearer token", headers=_CHALLENGE)
        return BOOTSTRAP

    async def _token(self, request: Request, source: str, given: str) -> Principal:
        parsed = parse_raw(given)
        token = None if parsed is None else await request.app.state.catalog.get_token(parsed[0])
        now = now_ms()
        if (
            parsed is None
            or token is None
            or not (secret_matches(token, parsed[1], now) and usable(token, now))
        ):
            # One answer for unknown, wrong, expired and revoked: nothing to learn from it.
            self._failed(source, "invalid")
            raise ApiError(
                401, "unauthorized", "invalid, expired or revoked bearer token", headers=_CHALLENGE
            )
        if token.id not in self.touched:
            self.touched[token.id] = now
            await request.app.state.catalog.touch_token(token.id, now)
        return principal_of(token)


def principal(request: Request) -> Principal:
    """Who is calling (set by ``protect`` before the endpoint runs)."""
    return request.state.principal


def scope(request: Request, tenant: str) -> str:
    """``tenant`` if the caller may see it; a 404 otherwise (not a 403: another
    tenant's objects are not even said to exist)."""
    who: Principal | None = getattr(request.state, "principal", None)
    if who is not None and not who.sees_tenant(tenant):
        raise NotFound(f"tenant {tenant!r} has nothing this token may see", code="tenant_not_found")
    return tenant


def scope_consumer(request: Request, tenant: str, consumer_id: str) -> None:
    """A 404 unless the caller may see this consumer (a developer token: only its own)."""
    scope(request, tenant)
    who: Principal | None = getattr(request.state, "principal", None)
    if who is not None and not who.sees_consumer(tenant, consumer_id):
        raise NotFound(f"consumer {consumer_id!r} does not exist", code="consumer_not_found")


Endpoint = Callable[[Request], Awaitable[Response]]


def _guarded(endpoint: Endpoint, roles: frozenset[Role]) -> Endpoint:
    async def guarded(request: Request) -> Response:
        gate: Gate = request.app.state.gate
        who = await gate.authenticate(request)
        if who.role not in roles:
            metrics.AUTH_FAILURES.labels("forbidden").inc()
            raise ApiError(
                403, "forbidden", f"a {who.role.value} token may not do this (needs: {describe(roles)})"
            )
        request.state.principal = who
        return await endpoint(request)

    guarded.__name__ = getattr(endpoint, "__name__", "endpoint")
    return guarded


def protect(routes: Sequence[BaseRoute]) -> list[BaseRoute]:
    """Each route with the check ``ACCESS`` names for it (ValueError for a route it
    does not name: no endpoint is served without a stated rule). Routes of one path are
    served as one, so a method the path does not take is a 405 naming every method it
    does (``Allow``), not only those of the first route."""
    by_path: dict[str, dict[str, Endpoint]] = {}
    for route in routes:
        if not isinstance(route, Route):
            raise ValueError(f"{route!r}: only plain routes are served")
        methods = sorted((route.methods or set()) - {"HEAD"})
        rules = {ACCESS.get((method, route.path)) for method in methods}
        if None in rules or len(rules) != 1:
            raise ValueError(f"{methods} {route.path} has no row in sidecar/http/access.py's ACCESS")
        (rule,) = rules
        endpoint = route.endpoint if isinstance(rule, str) else _guarded(route.endpoint, rule)
        for method in methods:
            by_path.setdefault(route.path, {})[method] = endpoint
    return [Route(path, _by_method(ends), methods=list(ends)) for path, ends in by_path.items()]


def _by_method(endpoints: dict[str, Endpoint]) -> Endpoint:
    if len(endpoints) == 1:
        return next(iter(endpoints.values()))

    async def endpoint(request: Request) -> Response:
        # HEAD is served as GET (Starlette adds it to a GET route).
        return await endpoints["GET" if request.method == "HEAD" else request.method](request)

    return endpoint
