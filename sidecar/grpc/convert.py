"""Between protobuf messages and the core's Structs. Validation stays in the core."""

from __future__ import annotations

from sidecar.core.models import DEFAULT_TENANT, AuthorizeRequest, ConsumerView, Decision, UsageEvent
from sidecar.grpc.gen.aforo.sidecar.v1 import sidecar_pb2 as pb


def authorize_request(message: pb.AuthorizeRequest) -> AuthorizeRequest:
    """The core request of a message, validated (raises InvalidInput)."""
    return AuthorizeRequest(
        product=message.product,
        tenant=message.tenant or DEFAULT_TENANT,
        consumer_id=message.consumer_id if message.HasField("consumer_id") else None,
        api_key=message.api_key if message.HasField("api_key") else None,
        operation=message.operation,
        cost=message.cost if message.HasField("cost") else None,
        hits=message.hits if message.HasField("hits") else 1,
        request_id=message.request_id if message.HasField("request_id") else None,
    ).validated()


def decision_message(decision: Decision) -> pb.Decision:
    return pb.Decision(
        allow=decision.allow,
        reason=decision.reason,
        status=decision.status,
        decision_id=decision.decision_id,
        request_id=decision.request_id,
        tenant=decision.tenant,
        consumer_id=decision.consumer_id,
        product=decision.product,
        ttl_seconds=decision.ttl_seconds,
        retry_after=decision.retry_after,
        windows=[
            pb.WindowStatus(window=w.window, limit=w.limit, remaining=w.remaining, reset=w.reset)
            for w in decision.windows
        ],
        balance=decision.balance,
        charged=decision.charged,
        degraded=decision.degraded,
        replayed=decision.replayed,
    )


def usage_event(message: pb.UsageEvent) -> UsageEvent:
    """The core event of a message, validated (raises InvalidInput)."""
    return UsageEvent(
        consumer_id=message.consumer_id,
        request_id=message.request_id,
        tenant=message.tenant or DEFAULT_TENANT,
        product=message.product,
        route=message.route,
        service=message.service,
        method=message.method,
        status=message.status,
        started_at_ms=message.started_at_ms,
        latency_ms=message.latency_ms,
        upstream_latency_ms=message.upstream_latency_ms,
        gateway_latency_ms=message.gateway_latency_ms,
        request_size=message.request_size,
        response_size=message.response_size,
        decision_id=message.decision_id,
        headers=dict(message.headers),
    ).validated()


def consumer_status(view: ConsumerView) -> pb.ConsumerStatus:
    return pb.ConsumerStatus(
        tenant=view.tenant,
        id=view.id,
        plan_id=view.plan_id,
        status=view.status.value,
        wallet_mode=view.wallet_mode.value,
        balance=view.balance,
        pending=view.pending,
        version=view.version,
        windows=view.windows,
    )
