"""Admin endpoints: plans, consumers, wallets, API keys, suspension.

Every endpoint's token is checked before it reads the body (http/access.py), so an
unauthorised call learns nothing and changes nothing; each keeps to the tenants (and,
for a developer token, the consumers) the token may see.
"""

from __future__ import annotations

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sidecar.authorizer import Authorizer
from sidecar.catalog import Catalog
from sidecar.core.access import Principal, Role
from sidecar.core.api_keys import checked_scopes, generate_api_key, hash_api_key
from sidecar.core.clock import check_lifetime, iso_utc, now_ms
from sidecar.core.errors import InvalidInput, NotFound
from sidecar.core.models import (
    CONSUMER_ID_RE,
    DEFAULT_TENANT,
    PLAN_ID_RE,
    REQUEST_ID_RE,
    TENANT_RE,
    ConsumerKey,
    ConsumerSpec,
    ConsumerStatus,
    ConsumerView,
    Plan,
    check_id,
)
from sidecar.core.money import MAX_MICROS
from sidecar.http.access import principal, scope, scope_consumer
from sidecar.http.admin_request import (
    Page,
    actor,
    admin_body,
    json_response,
    page_cursor,
    page_request,
    record,
    tenant_param,
)
from sidecar.http.bodies import decode_into
from sidecar.http.connections import push_status
from sidecar.http.errors import ApiError
from sidecar.store.base import Store

_KEY_HASH_LEN = 64


def _store(request: Request) -> Store:
    return request.app.state.store


def _catalog(request: Request) -> Catalog:
    return request.app.state.catalog


def _check_target(tenant: str, consumer_id: str) -> None:
    check_id(tenant, TENANT_RE, "tenant")
    check_id(consumer_id, CONSUMER_ID_RE, "consumer_id")


# --- plans -------------------------------------------------------------------------


async def put_plan(request: Request) -> Response:
    body = await admin_body(request)
    plan = decode_into(body, Plan, id=request.path_params["plan_id"]).validated()
    scope(request, plan.tenant)
    created = await _catalog(request).put_plan(plan, actor(request))
    record(request, "plan.put", plan.tenant, plan.id, windows=plan.windows, price=plan.price)
    return json_response(plan, 201 if created else 200)


async def list_plans(request: Request) -> Response:
    after, limit = page_request(request)
    plans, last = await _store(request).list_plans(tenant_param(request), after, limit)
    return json_response(Page(plans, page_cursor(last)))


async def delete_plan(request: Request) -> Response:
    tenant = tenant_param(request)
    plan_id = check_id(request.path_params["plan_id"], PLAN_ID_RE, "plan_id")
    if not await _catalog(request).delete_plan(tenant, plan_id, actor(request)):
        raise NotFound(f"plan {plan_id!r} does not exist", code="plan_not_found")
    record(request, "plan.delete", tenant, plan_id)
    return json_response({"deleted": True, "tenant": tenant, "id": plan_id})


async def get_plan(request: Request) -> Response:
    plan_id = check_id(request.path_params["plan_id"], PLAN_ID_RE, "plan_id")
    plan = await _store(request).get_plan(tenant_param(request), plan_id)
    if plan is None:
        raise NotFound(f"plan {plan_id!r} does not exist", code="plan_not_found")
    return json_response(plan)


# --- consumers ---------------------------------------------------------------------


async def put_consumer(request: Request) -> Response:
    body = await admin_body(request)
    spec = decode_into(body, ConsumerSpec, id=request.path_params["consumer_id"]).validated()
    scope(request, spec.tenant)
    view, created = await _catalog(request).put_consumer(spec, actor(request))
    record(request, "consumer.put", spec.tenant, spec.id, plan=spec.plan_id, status=spec.status)
    return json_response(view, 201 if created else 200)


async def get_consumer(request: Request) -> Response:
    tenant = tenant_param(request)
    consumer_id = check_id(request.path_params["consumer_id"], CONSUMER_ID_RE, "consumer_id")
    scope_consumer(request, tenant, consumer_id)
    view = await _store(request).get_consumer(tenant, consumer_id, now_ms())
    if view is None:
        raise NotFound(f"consumer {consumer_id!r} does not exist", code="consumer_not_found")
    return json_response(view)


async def list_consumers(request: Request) -> Response:
    after, limit = page_request(request)
    params = request.query_params
    plan_id = params.get("plan_id")
    if plan_id is not None:
        check_id(plan_id, PLAN_ID_RE, "plan_id")
    status = params.get("status")
    if status is not None and status not in {s.value for s in ConsumerStatus}:
        raise InvalidInput(
            f"status {status!r} is not one of: {', '.join(s.value for s in ConsumerStatus)}", field="status"
        )
    tenant = tenant_param(request)
    who = principal(request)
    if who.role is Role.DEVELOPER:
        # Its own consumers only, whatever the page holds.
        return json_response(Page(await _own_consumers(request, tenant, who, plan_id, status), None))
    views, last = await _store(request).list_consumers(
        tenant,
        after,
        limit,
        now_ms(),
        plan_id=plan_id,
        status=None if status is None else ConsumerStatus(status),
    )
    return json_response(Page(views, page_cursor(last)))


async def _own_consumers(
    request: Request, tenant: str, who: Principal, plan_id: str | None, status: str | None
) -> list[ConsumerView]:
    """The consumers a developer token names, filtered as a list call asks."""
    views = []
    for consumer_id in sorted(who.consumers):
        view = await _store(request).get_consumer(tenant, consumer_id, now_ms())
        if view is None or (plan_id is not None and view.plan_id != plan_id):
            continue
        if status is None or view.status == status:
            views.append(view)
    return views


async def delete_consumer(request: Request) -> Response:
    tenant = tenant_param(request)
    consumer_id = check_id(request.path_params["consumer_id"], CONSUMER_ID_RE, "consumer_id")
    if not await _catalog(request).delete_consumer(tenant, consumer_id, actor(request)):
        raise NotFound(f"consumer {consumer_id!r} does not exist", code="consumer_not_found")
    authorizer: Authorizer = request.app.state.authorizer
    authorizer.forget_consumer(tenant, consumer_id)
    record(request, "consumer.delete", tenant, consumer_id)
    return json_response({"deleted": True, "tenant": tenant, "id": consumer_id})


class KeyInfo(msgspec.Struct):
    key_hash: str
    created_at: str | None  # ISO 8601 UTC; None: registered before the sidecar kept the time
    expires_at: str | None  # None: never
    scopes: tuple[str, ...]  # empty: every product of the plan
    last_used_at: None = None  # not tracked: it would cost a write per decision


def key_info(key: ConsumerKey) -> KeyInfo:
    return KeyInfo(key.key_hash, iso_utc(key.created_ms), iso_utc(key.expires_ms), key.scopes)


async def list_keys(request: Request) -> Response:
    tenant = tenant_param(request)
    consumer_id = check_id(request.path_params["consumer_id"], CONSUMER_ID_RE, "consumer_id")
    keys = await _catalog(request).consumer_keys(tenant, consumer_id)
    if keys is None:
        raise NotFound(f"consumer {consumer_id!r} does not exist", code="consumer_not_found")
    items = [key_info(k) for k in keys]
    return json_response({"tenant": tenant, "consumer_id": consumer_id, "keys": items})


async def list_notices(request: Request) -> Response:
    """The consumer's wallet notices: suspended (wallet_empty), resumed, topup_requested."""
    tenant = tenant_param(request)
    consumer_id = check_id(request.path_params["consumer_id"], CONSUMER_ID_RE, "consumer_id")
    scope_consumer(request, tenant, consumer_id)
    notices = await _catalog(request).notices(tenant, consumer_id)
    if notices is None:
        raise NotFound(f"consumer {consumer_id!r} does not exist", code="consumer_not_found")
    return json_response({"tenant": tenant, "consumer_id": consumer_id, "items": notices})


class StatusChange(msgspec.Struct, forbid_unknown_fields=True):
    consumer_id: str
    tenant: str = DEFAULT_TENANT
    reason: str = ""


async def change_status(
    request: Request, tenant: str, consumer_id: str, status: ConsumerStatus, reason: str
) -> Response:
    _check_target(tenant, consumer_id)
    scope(request, tenant)
    if len(reason) > 1000:
        raise InvalidInput("reason is longer than 1000 characters", field="reason")
    if status is not ConsumerStatus.REVOKED:
        # Revocation is for good; bringing a revoked consumer back is a deliberate
        # PUT of the consumer with status "active", not a resume, nor a suspension
        # (which a resume could then lift).
        current = await _store(request).get_consumer(tenant, consumer_id, now_ms())
        if current is not None and current.status is ConsumerStatus.REVOKED:
            raise ApiError(
                409,
                "consumer_revoked",
                "a revoked consumer is neither suspended nor resumed; PUT it with status active "
                "to reinstate it",
            )
    view = await _catalog(request).set_status(tenant, consumer_id, status, actor(request))
    record(request, f"consumer.{status.value}", tenant, consumer_id, reason=reason)
    pushes = await push_status(request, tenant, consumer_id, status is ConsumerStatus.ACTIVE)
    if not pushes:
        return json_response(view)
    # Gateways this consumer came from, told of its status (connection option push_status).
    return json_response(msgspec.structs.asdict(view) | {"pushed": pushes})


def _status_endpoint(status: ConsumerStatus):
    async def endpoint(request: Request) -> Response:
        body = await admin_body(request)
        change = decode_into(body, StatusChange, consumer_id=request.path_params["consumer_id"])
        return await change_status(request, change.tenant, change.consumer_id, status, change.reason)

    return endpoint


class TopUp(msgspec.Struct, forbid_unknown_fields=True):
    consumer_id: str
    amount: int  # micros, > 0
    reference: str | None = None  # idempotency: a reference is credited once
    tenant: str = DEFAULT_TENANT


async def top_up(request: Request) -> Response:
    body = await admin_body(request)
    topup = decode_into(body, TopUp, consumer_id=request.path_params["consumer_id"])
    _check_target(topup.tenant, topup.consumer_id)
    scope(request, topup.tenant)
    if not 0 < topup.amount <= MAX_MICROS:
        raise InvalidInput(
            f"amount must be between 1 and {MAX_MICROS} micros", code="invalid_amount", field="amount"
        )
    if topup.reference is not None:
        check_id(topup.reference, REQUEST_ID_RE, "reference")
    result = await _catalog(request).top_up(
        topup.tenant, topup.consumer_id, topup.amount, topup.reference, actor(request)
    )
    record(
        request,
        "wallet.topup",
        topup.tenant,
        topup.consumer_id,
        amount=topup.amount,
        reference=topup.reference,
        applied=result.applied,
    )
    return json_response({"balance": result.balance, "applied": result.applied})


# --- API keys ----------------------------------------------------------------------


class KeyRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Without ``key_hash`` or ``api_key`` a key is generated; with one of them an
    existing key is registered (a migration from a gateway needs no key rotation)."""

    consumer_id: str
    tenant: str = DEFAULT_TENANT
    key_hash: str | None = None
    api_key: str | None = None
    scopes: list[str] = []  # product ids or product:operation; empty: every product
    expires_in_seconds: int | None = None  # None: never


def _key_hash(value: str) -> str:
    key_hash = value.lower()
    if len(key_hash) != _KEY_HASH_LEN or any(ch not in "0123456789abcdef" for ch in key_hash):
        raise InvalidInput("key_hash must be 64 hex digits (SHA-256)", field="key_hash")
    return key_hash


async def create_key(request: Request) -> Response:
    body = await admin_body(request)
    ask = decode_into(body, KeyRequest, consumer_id=request.path_params["consumer_id"])
    _check_target(ask.tenant, ask.consumer_id)
    scope(request, ask.tenant)
    if ask.key_hash is not None and ask.api_key is not None:
        raise InvalidInput("give key_hash or api_key, not both", field="api_key")
    if ask.api_key is not None and not 8 <= len(ask.api_key) <= 512:
        raise InvalidInput("api_key must be 8 to 512 characters", code="invalid_key", field="api_key")
    scopes = checked_scopes(ask.scopes)
    check_lifetime(ask.expires_in_seconds)
    expires_ms = None if ask.expires_in_seconds is None else now_ms() + ask.expires_in_seconds * 1000
    raw = None
    if ask.key_hash is not None or ask.api_key is not None:
        key_hash = _key_hash(ask.key_hash) if ask.key_hash is not None else hash_api_key(ask.api_key or "")
    else:
        raw = generate_api_key()
        key_hash = hash_api_key(raw)
    key = ConsumerKey(key_hash, None, expires_ms, scopes)
    await _catalog(request).add_key(ask.tenant, ask.consumer_id, key, actor(request))
    shown = {"scopes": list(scopes), "expires_at": iso_utc(expires_ms)}
    action = "key.import" if raw is None else "key.create"
    record(request, action, ask.tenant, ask.consumer_id, key_hash=key_hash, **shown)
    body = {"key_hash": key_hash, "consumer_id": ask.consumer_id, "tenant": ask.tenant, **shown}
    if raw is None:
        return json_response({**body, "imported": True}, 201)
    note = "the raw key is shown only now; the sidecar keeps its SHA-256 hash"
    return json_response({"api_key": raw, **body, "note": note}, 201)


async def revoke_key(request: Request) -> Response:
    tenant = tenant_param(request)
    consumer_id = check_id(request.path_params["consumer_id"], CONSUMER_ID_RE, "consumer_id")
    key_hash = _key_hash(request.path_params["key_hash"])
    removed = await _catalog(request).revoke_key(tenant, consumer_id, key_hash, actor(request))
    if not removed:
        raise NotFound("no such key on this consumer", code="key_not_found")
    authorizer: Authorizer = request.app.state.authorizer
    authorizer.forget_key(tenant, key_hash)
    record(request, "key.revoke", tenant, consumer_id, key_hash=key_hash)
    return json_response({"revoked": True, "key_hash": key_hash})


ROUTES = [
    Route("/v1/admin/plans", list_plans, methods=["GET"]),
    Route("/v1/admin/plans/{plan_id}", put_plan, methods=["PUT"]),
    Route("/v1/admin/plans/{plan_id}", get_plan, methods=["GET"]),
    Route("/v1/admin/plans/{plan_id}", delete_plan, methods=["DELETE"]),
    Route("/v1/admin/consumers", list_consumers, methods=["GET"]),
    Route("/v1/admin/consumers/{consumer_id}", put_consumer, methods=["PUT"]),
    Route("/v1/admin/consumers/{consumer_id}", get_consumer, methods=["GET"]),
    Route("/v1/admin/consumers/{consumer_id}", delete_consumer, methods=["DELETE"]),
    Route("/v1/admin/consumers/{consumer_id}/keys", list_keys, methods=["GET"]),
    Route("/v1/admin/consumers/{consumer_id}/wallet-notices", list_notices, methods=["GET"]),
    Route(
        "/v1/admin/consumers/{consumer_id}/suspend",
        _status_endpoint(ConsumerStatus.SUSPENDED),
        methods=["POST"],
    ),
    Route(
        "/v1/admin/consumers/{consumer_id}/resume",
        _status_endpoint(ConsumerStatus.ACTIVE),
        methods=["POST"],
    ),
    Route(
        "/v1/admin/consumers/{consumer_id}/revoke",
        _status_endpoint(ConsumerStatus.REVOKED),
        methods=["POST"],
    ),
    Route("/v1/admin/consumers/{consumer_id}/topup", top_up, methods=["POST"]),
    Route("/v1/admin/consumers/{consumer_id}/keys", create_key, methods=["POST"]),
    Route("/v1/admin/consumers/{consumer_id}/keys/{key_hash}", revoke_key, methods=["DELETE"]),
]
