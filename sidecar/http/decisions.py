"""Decision endpoints: POST /v1/authorize and the Apigee seed contract.

Each endpoint is a DecisionRoute: ``parse`` turns a body into a validated request
(InvalidInput for one it refuses), ``render`` turns the decision into an Answer. The
Starlette routes and the decision port's fast server (decision_server.py) both serve
them, so the answers are identical."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import NamedTuple

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from sidecar.authorizer import Authorizer
from sidecar.core.errors import InvalidInput
from sidecar.core.models import DEFAULT_TENANT, AuthorizeRequest, Decision
from sidecar.core.money import MoneyError, format_micros, to_micros
from sidecar.gateway_tokens import INVALID, MISSING, REFUSALS, GatewayTokens
from sidecar.http.bodies import decode, read_body
from sidecar.http.errors import ApiError

_authorize_decoder = msgspec.json.Decoder(AuthorizeRequest)
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="aforo-gateway"'}
_encode = msgspec.json.Encoder(decimal_format="number").encode


class Answer(NamedTuple):
    status: int
    body: bytes
    retry_after: int | None


def _response(answer: Answer) -> Response:
    headers = None if answer.retry_after is None else {"Retry-After": str(answer.retry_after)}
    return Response(answer.body, status_code=answer.status, media_type="application/json", headers=headers)


class DecisionRoute(NamedTuple):
    parse: Callable[[bytes], AuthorizeRequest]
    render: Callable[[Decision], Answer]


async def decide(authorizer: Authorizer, route: DecisionRoute, body: bytes, auth: str | None) -> Answer:
    """Parse, check the gateway token (``auth``: the Authorization header; when
    required), decide and render one request (InvalidInput for a bad body)."""
    request = route.parse(body)
    await check_gateway(authorizer.gateway_tokens, auth, request.tenant)
    return route.render(await authorizer.authorize(request))


async def check_gateway(tokens: GatewayTokens, auth: str | None, tenant: str | None) -> None:
    """401 unless the call carries a gateway token of ``tenant`` (None: of any tenant),
    when one is required."""
    refused = await tokens.check(auth, tenant)
    if refused == MISSING:
        raise ApiError(401, "gateway_token_required", REFUSALS[MISSING], headers=_CHALLENGE)
    if refused is not None:
        raise ApiError(401, "unauthorized", REFUSALS[INVALID], headers=_CHALLENGE)


def _parse_v1(body: bytes) -> AuthorizeRequest:
    return decode(body, _authorize_decoder).validated()


def _render_v1(decision: Decision) -> Answer:
    return Answer(decision.status, _encode(decision), decision.retry_after)


V1 = DecisionRoute(_parse_v1, _render_v1)


async def authorize(request: Request) -> Response:
    body = await read_body(request, request.app.state.settings.max_body_bytes)
    auth = request.headers.get("authorization")
    return _response(await decide(request.app.state.authorizer, V1, body, auth))


class ApigeeAuthorize(msgspec.Struct, forbid_unknown_fields=True):
    """The seed contract an Apigee ServiceCallout sends. ``estimatedCost`` is in currency
    units (0.05), converted to micros exactly; absent, the plan's price applies."""

    appId: str
    apiProduct: str
    operation: str = ""
    estimatedCost: Decimal | None = None
    requestId: str | None = None
    tenant: str = DEFAULT_TENANT


class ApigeeDecision(msgspec.Struct):
    allow: bool
    reason: str
    ttl_seconds: int
    remainingBalance: msgspec.Raw | None  # an exact JSON number, e.g. 9.95
    status: int
    retryAfter: int | None
    decisionId: str
    degraded: bool


_apigee_decoder = msgspec.json.Decoder(ApigeeAuthorize)
_APIGEE_FIELDS = {"consumer_id": "appId", "product": "apiProduct", "request_id": "requestId"}


def _parse_apigee(body: bytes) -> AuthorizeRequest:
    seed = decode(body, _apigee_decoder)
    cost = None
    if seed.estimatedCost is not None:
        try:
            cost = to_micros(seed.estimatedCost)
        except MoneyError as exc:
            raise InvalidInput(
                f"estimatedCost: {exc}", code="invalid_amount", field="estimatedCost"
            ) from None
    try:
        return AuthorizeRequest(
            tenant=seed.tenant,
            consumer_id=seed.appId,
            product=seed.apiProduct,
            operation=seed.operation,
            cost=cost,
            request_id=seed.requestId,
        ).validated()
    except InvalidInput as exc:
        # Name the field as the caller spelled it.
        exc.field = _APIGEE_FIELDS.get(exc.field or "", exc.field)
        raise


def _render_apigee(decision: Decision) -> Answer:
    answer = ApigeeDecision(
        allow=decision.allow,
        reason=decision.reason,
        ttl_seconds=decision.ttl_seconds,
        remainingBalance=None
        if decision.balance is None
        else msgspec.Raw(format_micros(decision.balance).encode()),
        status=decision.status,
        retryAfter=decision.retry_after,
        decisionId=decision.decision_id,
        degraded=decision.degraded,
    )
    return Answer(decision.status, _encode(answer), decision.retry_after)


# POST /integrations/apigee/authorize: the seed contract.
APIGEE = DecisionRoute(_parse_apigee, _render_apigee)


async def apigee_authorize(request: Request) -> Response:
    body = await read_body(request, request.app.state.settings.max_body_bytes)
    auth = request.headers.get("authorization")
    return _response(await decide(request.app.state.authorizer, APIGEE, body, auth))
