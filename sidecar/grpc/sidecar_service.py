"""aforo.sidecar.v1.Sidecar: decisions, batches, usage events, consumer status."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

import grpc

from sidecar import metrics
from sidecar.authorizer import Authorizer, DeadlineExceeded, Pending
from sidecar.config import Settings
from sidecar.core.clock import now_ms
from sidecar.core.errors import InvalidInput
from sidecar.core.models import (
    CONSUMER_ID_RE,
    DEFAULT_TENANT,
    TENANT_RE,
    AuthorizeRequest,
    Decision,
    UsageEvent,
    check_id,
)
from sidecar.gateway_tokens import REFUSALS
from sidecar.grpc import convert
from sidecar.grpc.errors import abort_invalid
from sidecar.grpc.gen.aforo.sidecar.v1 import sidecar_pb2 as pb
from sidecar.grpc.gen.aforo.sidecar.v1 import sidecar_pb2_grpc as pb_grpc
from sidecar.store.base import Store, StoreUnavailable

# Events are written to the store in slices of this size (one round trip each).
EVENT_FLUSH = 500
# How many per-event errors a UsageAck lists (the count is always complete).
ACK_ERRORS = 10


class SidecarService(pb_grpc.SidecarServicer):
    def __init__(self, authorizer: Authorizer, store: Store, settings: Settings) -> None:
        self.authorizer = authorizer
        self.store = store
        self.max_batch = settings.max_batch_items
        self.event_ttl_ms = settings.event_dedupe_ttl_seconds * 1000

    async def _gateway(self, context: grpc.aio.ServicerContext, tenants: Iterable[str]) -> None:
        """UNAUTHENTICATED unless the call's ``authorization`` metadata carries a gateway
        token of each of ``tenants`` (when require_gateway_token is on)."""
        tokens = self.authorizer.gateway_tokens
        if not tokens.required:
            return
        auth = next((str(v) for k, v in context.invocation_metadata() or () if k == "authorization"), None)
        for tenant in sorted(set(tenants)):
            refused = await tokens.check(auth, tenant)
            if refused is not None:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSALS[refused])

    @staticmethod
    def _convert(request: pb.AuthorizeRequest) -> AuthorizeRequest | InvalidInput:
        try:
            return convert.authorize_request(request)
        except InvalidInput as exc:
            return exc

    def _begin(
        self, query: AuthorizeRequest | InvalidInput, context: grpc.aio.ServicerContext
    ) -> Pending | InvalidInput:
        if isinstance(query, InvalidInput):
            return query
        return self.authorizer.begin(query, deadline_s=context.time_remaining())

    async def _wait(self, pending: Pending, context: grpc.aio.ServicerContext) -> Decision:
        try:
            return await self.authorizer.wait(pending)
        except DeadlineExceeded:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED, "the call's deadline passed while waiting on the store"
            )
            raise  # unreachable: abort raises

    async def Authorize(self, request: pb.AuthorizeRequest, context: grpc.aio.ServicerContext) -> pb.Decision:
        query = self._convert(request)
        if not isinstance(query, InvalidInput):
            await self._gateway(context, (query.tenant,))
        begun = self._begin(query, context)
        if isinstance(begun, InvalidInput):
            await abort_invalid(context, begun)
        return convert.decision_message(await self._wait(begun, context))

    async def AuthorizeBatch(
        self, request: pb.AuthorizeBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.AuthorizeBatchResponse:
        if len(request.requests) > self.max_batch:
            await abort_invalid(
                context,
                InvalidInput(
                    f"a batch holds at most {self.max_batch} requests",
                    code="batch_too_large",
                    field="requests",
                ),
            )
        # Independent decisions: all begun first, so they share store round trips.
        queries = [self._convert(item) for item in request.requests]
        await self._gateway(context, (q.tenant for q in queries if not isinstance(q, InvalidInput)))
        begun = [self._begin(query, context) for query in queries]
        results = []
        for at, item in enumerate(begun):
            if isinstance(item, InvalidInput):
                error = pb.Error(code=item.code, message=item.message, field=item.field or "")
                results.append(pb.AuthorizeBatchResult(error=error))
                continue
            try:
                decision = await self._wait(item, context)
            except BaseException:  # the deadline passed or the call was cancelled
                for rest in begun[at + 1 :]:
                    if not isinstance(rest, InvalidInput):
                        self.authorizer.abandon(rest)
                raise
            results.append(pb.AuthorizeBatchResult(decision=convert.decision_message(decision)))
        return pb.AuthorizeBatchResponse(results=results)

    async def ReportUsage(
        self, request_iterator: AsyncIterator[pb.UsageEvent], context: grpc.aio.ServicerContext
    ) -> pb.UsageAck:
        ack = pb.UsageAck()
        pending: list[UsageEvent] = []

        async def flush() -> None:
            await self._gateway(context, (event.tenant for event in pending))
            try:
                stored = await self.store.record_events(pending, self.event_ttl_ms)
            except StoreUnavailable:
                metrics.STORE_ERRORS.labels("grpc").inc()
                # Resending the whole stream is safe: stored events are deduplicated.
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    f"store unreachable after {ack.accepted} events were stored; resend the stream",
                )
            ack.accepted += sum(stored)
            ack.duplicates += len(stored) - sum(stored)
            pending.clear()

        async for message in request_iterator:
            try:
                pending.append(convert.usage_event(message))
            except InvalidInput as exc:
                ack.rejected += 1
                if len(ack.errors) < ACK_ERRORS:
                    ack.errors.append(pb.Error(code=exc.code, message=exc.message, field=exc.field or ""))
                continue
            if len(pending) >= EVENT_FLUSH:
                await flush()
        if pending:
            await flush()
        return ack

    async def GetConsumerStatus(
        self, request: pb.ConsumerStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.ConsumerStatus:
        tenant = request.tenant or DEFAULT_TENANT
        try:
            check_id(tenant, TENANT_RE, "tenant")
            check_id(request.consumer_id, CONSUMER_ID_RE, "consumer_id")
        except InvalidInput as exc:
            await abort_invalid(context, exc)
        await self._gateway(context, (tenant,))
        try:
            view = await self.store.get_consumer(tenant, request.consumer_id, now_ms())
        except StoreUnavailable as exc:
            metrics.STORE_ERRORS.labels("grpc").inc()
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        if view is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"consumer {request.consumer_id!r} does not exist")
        return convert.consumer_status(view)
