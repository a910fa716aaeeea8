"""The authorize service: from a validated request to a decision, over any store.

Transports (HTTP, gRPC) call this and only this for decisions. It owns the deadline,
the fail mode and the API key lookup cache. The breaker that spares a dead Redis a
connection attempt per request is per Redis node, in the store (store/resp.py): on a
cluster, a master that is down answers its own consumers from the fail mode and no
other.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import msgspec
from cachetools import TTLCache

from sidecar import metrics
from sidecar.config import Settings
from sidecar.core.api_keys import hash_api_key
from sidecar.core.clock import now_ms
from sidecar.core.decision import DecisionPolicy, new_decision_id, present, unavailable
from sidecar.core.models import AuthorizeRequest, Decision, Outcome
from sidecar.core.reasons import Reason
from sidecar.core.windows import WINDOWS, periods
from sidecar.gateway_tokens import GatewayTokens, Lookup
from sidecar.standing_denials import StandingDenials
from sidecar.store.base import DecisionCall, Store, StoreDown, StoreUnavailable

_NO_WINDOWS = (None,) * len(WINDOWS)


class DeadlineExceeded(Exception):
    """The caller's own deadline (shorter than the sidecar's) passed first. Nothing was
    applied (the store refuses late decisions); the caller is no longer listening, so
    no fail-mode answer is produced."""


def _owner_key(tenant: str, key_hash: str) -> str:
    """The key owner cache's key (forget_consumer matches on its tenant prefix)."""
    return f"{tenant}:{key_hash}"


def _rememberable(request: AuthorizeRequest) -> bool:
    """Whether a standing denial may answer this request, and its answer be remembered:
    a consumer named by id, no request id (one allowed earlier must replay its allow)."""
    return request.api_key is None and request.request_id is None


def _done(outcome: Outcome) -> asyncio.Future[Outcome]:
    future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
    future.set_result(outcome)
    return future


def _drop_outcome(future: asyncio.Future[Outcome]) -> None:
    if not future.cancelled():
        future.exception()


class Pending:
    """A decision begun: ``future`` resolves to the store's Outcome. Holds no
    reference to whoever waits for it."""

    __slots__ = (
        "caller_bound",
        "consumer_id",
        "decision_id",
        "future",
        "moment",
        "periods",
        "remembered",
        "request",
        "request_id",
        "started",
    )

    def __init__(
        self,
        request: AuthorizeRequest,
        decision_id: str,
        request_id: str,
        moment: int,
        caller_bound: bool,
        started: float,
    ) -> None:
        self.request = request
        self.decision_id = decision_id
        self.request_id = request_id
        self.moment = moment
        self.periods = periods(moment)  # window starts and resets, for the store and the answer
        self.caller_bound = caller_bound
        self.started = started
        self.consumer_id = request.consumer_id
        self.remembered = False  # answered from the standing denials, not by the store
        self.future: asyncio.Future[Outcome]


class Authorizer:
    def __init__(self, store: Store, settings: Settings, token_lookup: Lookup | None = None) -> None:
        self.store = store
        self.settings = settings
        self.policy = DecisionPolicy(
            deny_ttl_seconds=settings.deny_ttl_seconds,
            quota_ttl_cap_seconds=settings.quota_ttl_cap_seconds,
        )
        self._deadline_s = settings.decision_timeout_ms / 1000
        self._apply_margin_ms = settings.late_apply_margin_ms
        self._idempotency_ttl_ms = settings.idempotency_ttl_seconds * 1000
        # A key hash belongs to one consumer for good (keys are generated, never
        # reassigned); revocation is checked by the store on every decision, so this
        # cache can only save lookups, never admit a revoked key.
        self._key_owner: TTLCache[str, str] = TTLCache(maxsize=100_000, ttl=300)
        # Used once the invalidation listener is up and the setting allows (server.py
        # sets it live).
        self.standing = StandingDenials()
        # The gateway token of a call, when required, looked up where tokens are kept:
        # ``token_lookup`` (create_app passes its catalog's: Postgres when configured).
        self.gateway_tokens = GatewayTokens(
            settings.require_gateway_token, settings.admin_token, token_lookup or store.get_token
        )

    async def authorize(
        self, request: AuthorizeRequest, at_ms: int | None = None, deadline_s: float | None = None
    ) -> Decision:
        """Decide a request already checked by ``AuthorizeRequest.validated``.

        ``deadline_s`` is the time the caller still waits (a gRPC deadline); when it is
        shorter than the sidecar's own decision timeout and runs out, DeadlineExceeded
        is raised instead of a fail-mode decision.
        """
        return await self.wait(self.begin(request, at_ms, deadline_s))

    async def wait(self, pending: Pending) -> Decision:
        """Wait for a decision begun with ``begin`` and conclude it."""
        future = pending.future
        if not future.done():
            # conclude() reads the outcome or the failure off the future.
            with contextlib.suppress(Exception):
                await future
        return self.conclude(pending)

    def abandon(self, pending: Pending) -> None:
        """Nobody will conclude ``pending`` (its caller went away): its outcome is
        dropped without asyncio reporting an exception that was never retrieved."""
        pending.future.add_done_callback(_drop_outcome)

    def begin(
        self, request: AuthorizeRequest, at_ms: int | None = None, deadline_s: float | None = None
    ) -> Pending:
        """Start deciding (see ``authorize``). When ``pending.future`` is not done,
        wait for it (await, or a done callback), then call ``conclude``."""
        started = time.perf_counter()
        budget_s = self._deadline_s
        caller_bound = deadline_s is not None and deadline_s < budget_s
        if caller_bound:
            budget_s = max(0.0, deadline_s or 0.0)
        wall = now_ms()
        moment = wall if at_ms is None else at_ms
        decision_id = new_decision_id(moment)
        pending = Pending(
            request, decision_id, request.request_id or decision_id, moment, caller_bound, started
        )
        # One deadline for the whole decision. The store enforces it on its own pending
        # reply (no timer per call on the hot path); the API key lookup, a separate
        # round trip, gets a timeout of its own.
        deadline = time.monotonic() + budget_s
        apply_by_ms = wall + int(budget_s * 1000) + self._apply_margin_ms
        if request.api_key is None:
            if _rememberable(request):
                known = self.standing.recall(request.tenant, request.consumer_id, request.product, moment)  # type: ignore[arg-type]
                if known is not None:
                    pending.remembered = True
                    pending.future = _done(msgspec.structs.replace(known, decision_id=decision_id))
                    metrics.STANDING_DENIALS.inc()
                    return pending
            pending.future = self.store.decide(self._call(pending, None, apply_by_ms, deadline))
            return pending
        key_hash = hash_api_key(request.api_key)
        owner = self._key_owner.get(_owner_key(request.tenant, key_hash))
        if owner is None:
            pending.future = asyncio.ensure_future(
                self._decide_by_key(pending, key_hash, apply_by_ms, deadline)
            )
        else:
            pending.consumer_id = owner
            pending.future = self.store.decide(self._call(pending, key_hash, apply_by_ms, deadline))
        return pending

    async def _decide_by_key(
        self, pending: Pending, key_hash: str, apply_by_ms: int, deadline: float
    ) -> Outcome:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            pending.consumer_id = await self._resolve_owner(pending.request.tenant, key_hash)
        if pending.consumer_id is None:
            return Outcome(
                Reason.INVALID_KEY.value, 0, None, pending.decision_id, 0, _NO_WINDOWS, _NO_WINDOWS
            )
        return await self.store.decide(self._call(pending, key_hash, apply_by_ms, deadline))

    def _call(
        self, pending: Pending, key_hash: str | None, apply_by_ms: int, deadline: float
    ) -> DecisionCall:
        request = pending.request
        starts, resets = pending.periods
        return DecisionCall(
            tenant=request.tenant,
            consumer_id=pending.consumer_id,  # type: ignore[arg-type]
            key_hash=key_hash,
            product=request.product,
            operation=request.operation,
            cost=request.cost,
            hits=request.hits,
            request_id=pending.request_id,
            decision_id=pending.decision_id,
            now_ms=pending.moment,
            window_starts_ms=starts,
            resets_ms=resets,
            idempotency_ttl_ms=self._idempotency_ttl_ms if request.request_id else 0,
            apply_by_ms=apply_by_ms,
            deadline=deadline,
        )

    def conclude(self, pending: Pending) -> Decision:
        """The decision of a ``begin``, once its future (if any) is done. Raises
        DeadlineExceeded (see ``authorize``) and any error that is a bug."""
        request = pending.request
        future = pending.future
        consumer_id, request_id, decision_id = pending.consumer_id, pending.request_id, pending.decision_id
        failure = future.exception()
        if failure is None:
            outcome = future.result()
            if not pending.remembered and _rememberable(request):
                self.standing.learn(request.tenant, consumer_id, request.product, outcome, pending.periods[1])  # type: ignore[arg-type]
            decision = present(
                outcome,
                tenant=request.tenant,
                consumer_id=consumer_id,
                product=request.product,
                request_id=request_id,
                now_ms=pending.moment,
                resets_ms=pending.periods[1],
                policy=self.policy,
            )
        elif isinstance(failure, TimeoutError):
            if pending.caller_bound:
                raise DeadlineExceeded from None
            decision = self._fail(request, consumer_id, request_id, decision_id, counted=True)
        elif isinstance(failure, StoreUnavailable):
            # A node already known down (StoreDown) is not a new store error.
            counted = not isinstance(failure, StoreDown)
            decision = self._fail(request, consumer_id, request_id, decision_id, counted=counted)
        else:
            raise failure
        metrics.DECISIONS_BY_REASON[decision.reason].inc()
        metrics.DECISION_SECONDS.observe(time.perf_counter() - pending.started)
        return decision

    def _fail(
        self,
        request: AuthorizeRequest,
        consumer_id: str | None,
        request_id: str,
        decision_id: str,
        *,
        counted: bool,
    ) -> Decision:
        """The store did not answer in time: answer per fail mode."""
        if counted:
            metrics.STORE_ERRORS.labels("decide").inc()
        return self._unavailable(request, consumer_id, request_id, decision_id)

    def _unavailable(
        self, request: AuthorizeRequest, consumer_id: str | None, request_id: str, decision_id: str
    ) -> Decision:
        metrics.DEGRADED.inc()
        return unavailable(
            fail_open=self.settings.fail_open(request.tenant),
            tenant=request.tenant,
            consumer_id=consumer_id,
            product=request.product,
            request_id=request_id,
            decision_id=decision_id,
        )

    async def _resolve_owner(self, tenant: str, key_hash: str) -> str | None:
        owner = await self.store.resolve_key(tenant, key_hash)
        if owner is not None:
            self._key_owner[_owner_key(tenant, key_hash)] = owner
        return owner

    def forget_key(self, tenant: str, key_hash: str) -> None:
        self._key_owner.pop(_owner_key(tenant, key_hash), None)

    def forget_consumer(self, tenant: str, consumer_id: str) -> None:
        """Drop every cached entry that names this consumer (admin-rate, so a scan);
        ``*`` names every consumer of the tenant (a plan changed)."""
        self.standing.forget(tenant, consumer_id)
        for ident, owner in list(self._key_owner.items()):
            if owner == consumer_id and ident.startswith(f"{tenant}:"):
                self._key_owner.pop(ident, None)
