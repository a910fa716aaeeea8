"""Decision endpoints: POST /v1/authorize and the Apigee seed contract."""

from __future__ import annotations

from decimal import Decimal

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from sidecar.authorizer import Authorizer
from sidecar.core.errors import InvalidInput
from sidecar.core.models import DEFAULT_TENANT, AuthorizeRequest, Decision
from sidecar.core.money import MoneyError, from_micros, to_micros
from sidecar.http.bodies import decode, read_body

_authorize_decoder = msgspec.json.Decoder(AuthorizeRequest)
_encode = msgspec.json.Encoder(decimal_format="number").encode


def _headers(decision: Decision) -> dict[str, str] | None:
    if decision.retry_after is None:
        return None
    return {"Retry-After": str(decision.retry_after)}


async def authorize(request: Request) -> Response:
    authorizer: Authorizer = request.app.state.authorizer
    body = await read_body(request, request.app.state.settings.max_body_bytes)
    query = decode(body, _authorize_decoder).validated()
    decision = await authorizer.authorize(query)
    return Response(
        _encode(decision),
        status_code=decision.status,
        media_type="application/json",
        headers=_headers(decision),
    )


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
    remainingBalance: Decimal | None
    status: int
    retryAfter: int | None
    decisionId: str
    degraded: bool


_apigee_decoder = msgspec.json.Decoder(ApigeeAuthorize)
_APIGEE_FIELDS = {"consumer_id": "appId", "product": "apiProduct", "request_id": "requestId"}


async def apigee_authorize(request: Request) -> Response:
    authorizer: Authorizer = request.app.state.authorizer
    body = await read_body(request, request.app.state.settings.max_body_bytes)
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
        query = AuthorizeRequest(
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
    decision = await authorizer.authorize(query)
    answer = ApigeeDecision(
        allow=decision.allow,
        reason=decision.reason,
        ttl_seconds=decision.ttl_seconds,
        remainingBalance=None if decision.balance is None else from_micros(decision.balance),
        status=decision.status,
        retryAfter=decision.retry_after,
        decisionId=decision.decision_id,
        degraded=decision.degraded,
    )
    return Response(
        _encode(answer),
        status_code=decision.status,
        media_type="application/json",
        headers=_headers(decision),
    )
