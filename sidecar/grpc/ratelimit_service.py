"""envoy.service.ratelimit.v3.RateLimitService over the sidecar's decisions.

Envoy's rate limit filter (and Istio) send descriptors; a descriptor naming a consumer
becomes one decision:

    domain             the tenant
    consumer | api_key who calls (exactly one)
    product            what is called (required)
    operation          e.g. "GET /payments" (optional)
    cost               micros to charge (optional; the plan's price otherwise)
    request_id         idempotency key (optional)
    window             which window to report in the status (optional)
    hits_addend        (request field) quota units the call consumes, default 1

Descriptors without a consumer or api_key entry are not the sidecar's and answer OK.
Envoy only knows OK and OVER_LIMIT, so every denial is OVER_LIMIT; the reason travels
in the ``x-aforo-reason`` response header.
"""

from __future__ import annotations

import grpc
from google.protobuf.duration_pb2 import Duration

from sidecar.authorizer import Authorizer, DeadlineExceeded
from sidecar.core.clock import now_ms
from sidecar.core.digits import digits
from sidecar.core.errors import InvalidInput
from sidecar.core.models import TENANT_RE, AuthorizeRequest, Decision, WindowStatus, check_id
from sidecar.core.windows import parse_window
from sidecar.grpc.errors import abort_invalid
from sidecar.grpc.gen.envoy.config.core.v3 import base_pb2
from sidecar.grpc.gen.envoy.service.ratelimit.v3 import rls_pb2 as rls
from sidecar.grpc.gen.envoy.service.ratelimit.v3 import rls_pb2_grpc as rls_grpc

Code = rls.RateLimitResponse.Code
Unit = rls.RateLimitResponse.RateLimit.Unit
# Envoy's unit enum has no week: a weekly limit is reported with UNKNOWN and its name.
_UNITS = {
    "minute": Unit.MINUTE,
    "hour": Unit.HOUR,
    "day": Unit.DAY,
    "week": Unit.UNKNOWN,
    "month": Unit.MONTH,
}
_UINT32_MAX = 2**32 - 1
_OURS = ("consumer", "api_key")


def _parse_descriptor(tenant: str, entries: dict[str, str], hits: int) -> tuple[AuthorizeRequest, str | None]:
    """The decision request of one descriptor, and the window it asks to see."""
    cost_text = entries.get("cost")
    cost = None
    if cost_text is not None:
        if not digits(cost_text.lstrip("-")):
            raise InvalidInput(
                "cost must be an integer number of micros", code="invalid_amount", field="cost"
            )
        cost = int(cost_text)
    window = entries.get("window")
    if window is not None:
        try:
            parse_window(window)
        except ValueError as exc:
            raise InvalidInput(str(exc), code="unknown_window", field="window") from None
    if "product" not in entries:
        raise InvalidInput("descriptor entry 'product' is required", field="product")
    request = AuthorizeRequest(
        tenant=tenant,
        consumer_id=entries.get("consumer"),
        api_key=entries.get("api_key"),
        product=entries["product"],
        operation=entries.get("operation", ""),
        cost=cost,
        hits=hits,
        request_id=entries.get("request_id"),
    )
    try:
        return request.validated(), window
    except InvalidInput as exc:
        exc.field = {"consumer_id": "consumer"}.get(exc.field or "", exc.field)
        raise


def _reported_window(decision: Decision, wanted: str | None) -> WindowStatus | None:
    """The window a status shows: the one asked for, else the one that denied (latest
    reset among the exhausted), else the tightest (least remaining)."""
    if not decision.windows:
        return None
    if wanted is not None:
        return next((w for w in decision.windows if w.window == wanted), None)
    if decision.reason == "quota_exceeded":
        exhausted = [w for w in decision.windows if w.remaining == 0]
        if exhausted:
            return max(exhausted, key=lambda w: w.reset)
    return min(decision.windows, key=lambda w: w.remaining)


def _status(decision: Decision, wanted: str | None, now_s: int) -> rls.RateLimitResponse.DescriptorStatus:
    status = rls.RateLimitResponse.DescriptorStatus(code=Code.OK if decision.allow else Code.OVER_LIMIT)
    window = _reported_window(decision, wanted)
    if window is not None:
        status.current_limit.CopyFrom(
            rls.RateLimitResponse.RateLimit(
                name=window.window,
                requests_per_unit=min(window.limit, _UINT32_MAX),
                unit=_UNITS[window.window],
            )
        )
        status.limit_remaining = min(window.remaining, _UINT32_MAX)
        status.duration_until_reset.CopyFrom(Duration(seconds=max(0, window.reset - now_s)))
    return status


class RateLimitService(rls_grpc.RateLimitServiceServicer):
    def __init__(self, authorizer: Authorizer) -> None:
        self.authorizer = authorizer

    async def ShouldRateLimit(
        self, request: rls.RateLimitRequest, context: grpc.aio.ServicerContext
    ) -> rls.RateLimitResponse:
        try:
            tenant = check_id(request.domain, TENANT_RE, "domain")
            hits = request.hits_addend or 1
            parsed = []
            for descriptor in request.descriptors:
                entries = {entry.key: entry.value for entry in descriptor.entries}
                ours = any(key in entries for key in _OURS)
                parsed.append(_parse_descriptor(tenant, entries, hits) if ours else None)
        except InvalidInput as exc:
            await abort_invalid(context, exc)

        response = rls.RateLimitResponse(overall_code=Code.OK)
        now_s = now_ms() // 1000
        for item in parsed:
            if item is None:
                response.statuses.append(rls.RateLimitResponse.DescriptorStatus(code=Code.OK))
                continue
            query, wanted = item
            try:
                decision = await self.authorizer.authorize(query, deadline_s=context.time_remaining())
            except DeadlineExceeded:
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed waiting on the store")
            response.statuses.append(_status(decision, wanted, now_s))
            if not decision.allow:
                response.overall_code = Code.OVER_LIMIT
                response.response_headers_to_add.append(
                    base_pb2.HeaderValue(key="x-aforo-reason", value=decision.reason)
                )
                if decision.retry_after is not None:
                    response.response_headers_to_add.append(
                        base_pb2.HeaderValue(key="retry-after", value=str(decision.retry_after))
                    )
            else:
                response.request_headers_to_add.append(
                    base_pb2.HeaderValue(key="x-aforo-decision-id", value=decision.decision_id)
                )
        return response
