"""The embedded store: the same semantics as the Redis store, in one process.

Used when no Redis URL is configured (development, demos, a single-process gateway
test bed). Every operation runs without an ``await`` between its read and its write,
so it is atomic on the event loop, as a Lua script is on Redis.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import msgspec

from sidecar.core.access import ApiToken
from sidecar.core.alerts import quota_crossings
from sidecar.core.api_keys import key_refusal
from sidecar.core.decision import evaluate
from sidecar.core.errors import Conflict, InvalidInput, NotFound
from sidecar.core.models import (
    ConsumerKey,
    ConsumerSpec,
    ConsumerState,
    ConsumerStatus,
    ConsumerView,
    Outcome,
    Plan,
    UsageEvent,
    UsageRecord,
    WalletMode,
)
from sidecar.core.money import MAX_MICROS
from sidecar.core.reasons import Reason
from sidecar.core.wallet_rules import (
    AutoTopup,
    Notice,
    NoticeType,
    after_debit,
    event_time,
    rate_event,
    resumes,
    shown_status,
)
from sidecar.core.windows import WINDOWS, periods
from sidecar.store.base import DecisionCall, TopUpResult

K = TypeVar("K")
NOTICES_KEPT = 10_000  # wallet notices kept per consumer (the Redis stream's cap too)
V = TypeVar("V")


class _Expiring(Generic[K, V]):
    """A map whose entries vanish at their expiry (ms), purged as time moves on."""

    def __init__(self) -> None:
        self._items: dict[K, tuple[int, V]] = {}
        self._heap: list[tuple[int, int, K]] = []
        self._order = 0  # tie-breaker: keys need not be comparable

    def get(self, key: K, now_ms: int) -> V | None:
        heap = self._heap
        while heap and heap[0][0] <= now_ms:
            expiry, _, stale = heapq.heappop(heap)
            item = self._items.get(stale)
            if item is not None and item[0] == expiry:
                del self._items[stale]
        item = self._items.get(key)
        return None if item is None else item[1]

    def put(self, key: K, value: V, expiry_ms: int) -> None:
        self._items[key] = (expiry_ms, value)
        self._order += 1
        heapq.heappush(self._heap, (expiry_ms, self._order, key))


@dataclass
class _Consumer:
    plan_id: str
    status: ConsumerStatus = ConsumerStatus.ACTIVE
    wallet_mode: WalletMode = WalletMode.PREPAID
    base: int = 0
    # Debits not yet settled: the embedded store has no Postgres, so nothing settles.
    pending: int = 0
    version: int = 0
    keys: dict[str, ConsumerKey] = field(default_factory=dict)  # by hash
    # Per window index: (period start ms, count in that period).
    counters: dict[int, tuple[int, int]] = field(default_factory=dict)
    held_at: int | None = None  # the wallet hold (wallet_empty): since when
    resumed_at: int | None = None
    suspend_at_zero: bool = True
    auto_topup: AutoTopup | None = None
    notices: collections.deque[Notice] = field(default_factory=lambda: collections.deque(maxlen=NOTICES_KEPT))
    notice_seq: int = 0


class MemoryStore:
    def __init__(self, *, usage_capacity: int = 1_000_000) -> None:
        self._plans: dict[tuple[str, str], Plan] = {}
        self._consumers: dict[tuple[str, str], _Consumer] = {}
        self._keys: dict[tuple[str, str], str] = {}
        # request identity -> first allowed outcome, for the idempotency window.
        self._requests: _Expiring[tuple[str, str, str], Outcome] = _Expiring()
        self._topups: dict[tuple[str, str, str], int] = {}
        # No reconciler drains the embedded store: keep the newest records, bounded.
        self._usage: dict[tuple[str, str], collections.deque[UsageRecord]] = {}
        self._usage_capacity = usage_capacity
        self._events: dict[tuple[str, str], collections.deque[UsageEvent]] = {}
        self._event_markers: _Expiring[tuple[str, str, str], bool] = _Expiring()
        self._tokens: dict[str, ApiToken] = {}

    @staticmethod
    def _used(consumer: _Consumer, starts: tuple[int, ...]) -> list[int]:
        used = []
        for i, start in enumerate(starts):
            period = consumer.counters.get(i)
            used.append(period[1] if period is not None and period[0] == start else 0)
        return used

    @staticmethod
    def _key_refusal(consumer: _Consumer | None, call: DecisionCall) -> Reason | None:
        if call.key_hash is None:
            return None
        key = None if consumer is None else consumer.keys.get(call.key_hash)
        if key is None:
            return Reason.INVALID_KEY
        return key_refusal(key, call.product, call.operation, call.now_ms)

    def decide(self, call: DecisionCall) -> asyncio.Future[Outcome]:
        """Decided at once: the future is already resolved."""
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        future.set_result(self._decide(call))
        return future

    def _decide(self, call: DecisionCall) -> Outcome:
        ident = (call.tenant, call.consumer_id, call.request_id)
        first = self._requests.get(ident, call.now_ms)
        if first is not None:
            return msgspec.structs.replace(first, replayed=True)
        consumer = self._consumers.get((call.tenant, call.consumer_id))
        if consumer is None:
            state, limits, used = None, (None,) * len(WINDOWS), [0] * len(WINDOWS)
        else:
            plan = self._plans[(call.tenant, consumer.plan_id)]
            limits = plan.limits()
            state = ConsumerState(
                status=consumer.status,
                plan_id=plan.id,
                limits=limits,
                price=plan.price,
                products=tuple(plan.products),
                wallet_mode=consumer.wallet_mode,
                base=consumer.base,
                pending=consumer.pending,
                held=consumer.held_at is not None,
            )
            used = self._used(consumer, call.window_starts_ms)
        verdict = evaluate(
            state,
            key_refusal=self._key_refusal(consumer, call),
            product=call.product,
            cost=call.cost,
            hits=call.hits,
            used=used,
            resets_ms=call.resets_ms,
        )
        if consumer is None:
            return Outcome(verdict.reason.value, 0, None, call.decision_id, 0, limits, limits)
        crossings = ""
        if verdict.reason is Reason.OK:
            for i, limit in enumerate(limits):
                if limit is not None:
                    used[i] += call.hits
                    consumer.counters[i] = (call.window_starts_ms[i], used[i])
            crossings = quota_crossings(limits, used, call.hits, call.resets_ms)
            self._debit(consumer, plan.price, verdict.charged, call.now_ms)
            self._record(
                UsageRecord(
                    request_id=call.request_id,
                    decision_id=call.decision_id,
                    ts_ms=call.now_ms,
                    tenant=call.tenant,
                    consumer_id=call.consumer_id,
                    product=call.product,
                    operation=call.operation,
                    cost=verdict.charged,
                    hits=call.hits,
                    crossings=crossings,
                )
            )
        outcome = Outcome(
            reason=verdict.reason.value,
            charged=verdict.charged,
            balance=consumer.base - consumer.pending,
            decision_id=call.decision_id,
            retry_at_ms=verdict.retry_at_ms,
            used=tuple(u if limit is not None else None for u, limit in zip(used, limits, strict=True)),
            limits=limits,
        )
        if verdict.reason is Reason.OK and call.idempotency_ttl_ms > 0:
            self._requests.put(ident, outcome, call.now_ms + call.idempotency_ttl_ms)
        return outcome

    def _record(self, record: UsageRecord) -> None:
        self._usage.setdefault(
            (record.tenant, record.consumer_id), collections.deque(maxlen=self._usage_capacity)
        ).append(record)

    @staticmethod
    def _notify(consumer: _Consumer, kind: NoticeType, now_ms: int, **details: int | str) -> None:
        consumer.notice_seq += 1
        consumer.notices.append(
            Notice(
                id=f"{now_ms}-{consumer.notice_seq}",
                type=kind.value,
                at_ms=now_ms,
                balance=consumer.base - consumer.pending,
                **details,  # type: ignore[arg-type]
            )
        )

    def _debit(self, consumer: _Consumer, price: int, cost: int, now_ms: int) -> None:
        """Debit the wallet and apply the wallet rules to the crossing (wallet_rules)."""
        before = consumer.base - consumer.pending
        consumer.pending += cost
        rules = after_debit(
            before,
            before - cost,
            price=price,
            prepaid=consumer.wallet_mode is WalletMode.PREPAID,
            suspend_at_zero=consumer.suspend_at_zero,
            held=consumer.held_at is not None,
            topup=consumer.auto_topup,
        )
        if rules.hold:
            consumer.held_at = now_ms
            self._notify(consumer, NoticeType.SUSPENDED, now_ms)
        if rules.topup_requested:
            assert consumer.auto_topup is not None
            topup = consumer.auto_topup
            self._notify(
                consumer,
                NoticeType.TOPUP_REQUESTED,
                now_ms,
                threshold=topup.threshold,
                amount=topup.amount,
                currency=topup.currency,
            )

    def _credited(self, consumer: _Consumer, now_ms: int) -> None:
        """After a credit: a held wallet now above zero is resumed."""
        if resumes(consumer.held_at is not None, consumer.base - consumer.pending):
            consumer.held_at = None
            consumer.resumed_at = now_ms
            self._notify(consumer, NoticeType.RESUMED, now_ms)

    async def resolve_key(self, tenant: str, key_hash: str) -> str | None:
        return self._keys.get((tenant, key_hash))

    async def put_plan(self, plan: Plan) -> bool:
        created = (plan.tenant, plan.id) not in self._plans
        self._plans[(plan.tenant, plan.id)] = plan
        return created

    async def get_plan(self, tenant: str, plan_id: str) -> Plan | None:
        return self._plans.get((tenant, plan_id))

    @staticmethod
    def _shown(consumer: _Consumer) -> tuple[str, str | None]:
        return shown_status(consumer.status.value, consumer.held_at is not None)

    def _view(self, tenant: str, consumer_id: str, now_ms: int) -> ConsumerView | None:
        consumer = self._consumers.get((tenant, consumer_id))
        if consumer is None:
            return None
        limits = self._plans[(tenant, consumer.plan_id)].limits()
        used = self._used(consumer, periods(now_ms).starts)
        status, reason = self._shown(consumer)
        return ConsumerView(
            tenant=tenant,
            id=consumer_id,
            plan_id=consumer.plan_id,
            status=ConsumerStatus(status),
            status_reason=reason,
            suspended_at=consumer.held_at,
            resumed_at=consumer.resumed_at,
            suspend_at_zero=consumer.suspend_at_zero,
            auto_topup=consumer.auto_topup,
            wallet_mode=consumer.wallet_mode,
            balance=consumer.base - consumer.pending,
            pending=consumer.pending,
            version=consumer.version,
            windows={
                w.value: count
                for w, count, limit in zip(WINDOWS, used, limits, strict=True)
                if limit is not None
            },
        )

    async def put_consumer(self, consumer: ConsumerSpec, now_ms: int) -> tuple[ConsumerView, bool]:
        t, c = consumer.tenant, consumer.id
        if (t, consumer.plan_id) not in self._plans:
            raise NotFound(f"plan {consumer.plan_id!r} does not exist", code="plan_not_found")
        current = self._consumers.get((t, c))
        created = current is None
        if current is None:
            current = self._consumers[(t, c)] = _Consumer(plan_id=consumer.plan_id)
        current.plan_id = consumer.plan_id
        if consumer.status is not None:
            current.status = consumer.status
        if consumer.wallet_mode is not None:
            current.wallet_mode = consumer.wallet_mode
        if consumer.suspend_at_zero is not None:
            current.suspend_at_zero = consumer.suspend_at_zero
        if consumer.auto_topup is not None:
            current.auto_topup = consumer.auto_topup if consumer.auto_topup.enabled else None
        current.version += 1
        view = self._view(t, c, now_ms)
        assert view is not None
        return view, created

    async def get_consumer(self, tenant: str, consumer_id: str, now_ms: int) -> ConsumerView | None:
        return self._view(tenant, consumer_id, now_ms)

    def _existing(self, tenant: str, consumer_id: str) -> _Consumer:
        consumer = self._consumers.get((tenant, consumer_id))
        if consumer is None:
            raise NotFound(f"consumer {consumer_id!r} does not exist", code="consumer_not_found")
        return consumer

    async def set_status(
        self, tenant: str, consumer_id: str, status: ConsumerStatus, now_ms: int
    ) -> ConsumerView:
        consumer = self._existing(tenant, consumer_id)
        consumer.status = status
        consumer.version += 1
        view = self._view(tenant, consumer_id, now_ms)
        assert view is not None
        return view

    async def top_up(self, tenant: str, consumer_id: str, amount: int, reference: str | None) -> TopUpResult:
        consumer = self._existing(tenant, consumer_id)
        if reference:
            ident = (tenant, consumer_id, reference)
            if ident in self._topups:
                return TopUpResult(balance=consumer.base - consumer.pending, applied=False)
        if consumer.base + amount > MAX_MICROS:
            raise InvalidInput(
                f"the balance would exceed {MAX_MICROS} micros", code="invalid_amount", field="amount"
            )
        if reference:
            self._topups[(tenant, consumer_id, reference)] = amount
        consumer.base += amount
        consumer.version += 1
        self._credited(consumer, time.time_ns() // 1_000_000)
        return TopUpResult(balance=consumer.base - consumer.pending, applied=True)

    async def add_key(self, tenant: str, consumer_id: str, key: ConsumerKey) -> None:
        keys = self._existing(tenant, consumer_id).keys
        owner = self._keys.get((tenant, key.key_hash))
        if owner is not None and owner != consumer_id:
            raise Conflict("this key is registered to another consumer", code="key_in_use")
        first = keys.get(key.key_hash)
        if first is not None:  # registered again: its first registration time stays
            key = msgspec.structs.replace(key, created_ms=first.created_ms)
        keys[key.key_hash] = key
        self._keys[(tenant, key.key_hash)] = consumer_id

    async def publish_invalidation(self, tenant: str, consumer_id: str, *, wait: bool = False) -> None:
        """One process, nobody else to tell (its standing denials are never live)."""

    async def revoke_key(self, tenant: str, consumer_id: str, key_hash: str) -> bool:
        consumer = self._consumers.get((tenant, consumer_id))
        if consumer is None or key_hash not in consumer.keys:
            return False
        del consumer.keys[key_hash]
        self._keys.pop((tenant, key_hash), None)
        return True

    async def list_plans(self, tenant: str, after: str | None, limit: int) -> tuple[list[Plan], str | None]:
        ids = sorted(p for t, p in self._plans if t == tenant and (after is None or p > after))
        page = [self._plans[(tenant, p)] for p in ids[:limit]]
        return page, (ids[limit - 1] if len(ids) > limit else None)

    async def list_consumers(
        self,
        tenant: str,
        after: str | None,
        limit: int,
        now_ms: int,
        plan_id: str | None = None,
        status: ConsumerStatus | None = None,
    ) -> tuple[list[ConsumerView], str | None]:
        ids = sorted(
            c
            for (t, c), consumer in self._consumers.items()
            if t == tenant
            and (after is None or c > after)
            and (plan_id is None or consumer.plan_id == plan_id)
            and (status is None or self._shown(consumer)[0] == status)
        )
        page = [self._view(tenant, c, now_ms) for c in ids[:limit]]
        return [v for v in page if v is not None], (ids[limit - 1] if len(ids) > limit else None)

    async def consumer_keys(self, tenant: str, consumer_id: str) -> list[ConsumerKey] | None:
        consumer = self._consumers.get((tenant, consumer_id))
        if consumer is None:
            return None
        return sorted(consumer.keys.values())

    async def delete_plan(self, tenant: str, plan_id: str, force: bool = False) -> bool:
        if (tenant, plan_id) not in self._plans:
            return False
        bound = [
            c for (t, c), consumer in self._consumers.items() if t == tenant and consumer.plan_id == plan_id
        ]
        if bound and not force:
            raise Conflict(
                f"plan {plan_id!r} has {len(bound)} consumers bound to it; move or delete them first",
                code="plan_in_use",
            )
        del self._plans[(tenant, plan_id)]
        return True

    async def delete_consumer(self, tenant: str, consumer_id: str, now_ms: int) -> bool:
        consumer = self._consumers.pop((tenant, consumer_id), None)
        if consumer is None:
            return False
        for key_hash in consumer.keys:
            if self._keys.get((tenant, key_hash)) == consumer_id:
                del self._keys[(tenant, key_hash)]
        return True

    async def usage(self, tenant: str, consumer_id: str) -> list[UsageRecord]:
        return list(self._usage.get((tenant, consumer_id), ()))

    async def record_events(
        self, events: Sequence[UsageEvent], dedupe_ttl_ms: int, rate: bool = True
    ) -> list[bool]:
        now = time.time_ns() // 1_000_000
        results = []
        for event in events:
            ident = (event.tenant, event.consumer_id, event.request_id)
            if self._event_markers.get(ident, now):
                results.append(False)
                continue
            self._event_markers.put(ident, True, now + dedupe_ttl_ms)
            self._events.setdefault(
                (event.tenant, event.consumer_id), collections.deque(maxlen=self._usage_capacity)
            ).append(event)
            if rate:
                self._rate(event, now)
            results.append(True)
        return results

    def _rate(self, event: UsageEvent, now_ms: int) -> None:
        """Count and charge an event no decision of this store covered (event.lua)."""
        consumer = self._consumers.get((event.tenant, event.consumer_id))
        covered = event.decision_id or self._requests.get(
            (event.tenant, event.consumer_id, event.request_id), now_ms
        )
        if consumer is None or covered:
            return
        plan = self._plans[(event.tenant, consumer.plan_id)]
        rating = rate_event(event.count, plan.price)
        if rating is None:
            return
        at = event_time(event.started_at_ms, now_ms)
        bounds = periods(at)
        limits: list[int | None] = [None] * len(WINDOWS)
        used: list[int | None] = [None] * len(WINDOWS)
        for i, limit in enumerate(plan.limits()):
            # Only a period still running is counted: an ended one is gone from Redis too.
            if limit is not None and bounds.resets[i] > now_ms:
                period = consumer.counters.get(i)
                count = period[1] if period is not None and period[0] == bounds.starts[i] else 0
                consumer.counters[i] = (bounds.starts[i], count + rating.hits)
                limits[i], used[i] = limit, count + rating.hits
        self._debit(consumer, plan.price, rating.cost, now_ms)
        self._record(
            UsageRecord(
                request_id=event.request_id,
                decision_id=f"ev:{event.request_id}",
                ts_ms=at,
                tenant=event.tenant,
                consumer_id=event.consumer_id,
                product=event.product,
                operation=event.route,
                cost=rating.cost,
                hits=rating.hits,
                crossings=quota_crossings(limits, used, rating.hits, bounds.resets),
            )
        )

    async def notices(self, tenant: str, consumer_id: str) -> list[Notice] | None:
        consumer = self._consumers.get((tenant, consumer_id))
        return None if consumer is None else list(consumer.notices)

    async def events(self, tenant: str, consumer_id: str) -> list[UsageEvent]:
        return list(self._events.get((tenant, consumer_id), ()))

    async def put_token(self, token: ApiToken) -> None:
        held = self._tokens.get(token.id)
        used = None if held is None else held.last_used_ms
        self._tokens[token.id] = msgspec.structs.replace(token, last_used_ms=used)

    async def get_token(self, token_id: str) -> ApiToken | None:
        return self._tokens.get(token_id)

    async def list_tokens(self, tenant: str) -> list[ApiToken]:
        mine = [t for t in self._tokens.values() if t.tenant == tenant]
        return sorted(mine, key=lambda t: (t.created_ms, t.id))

    async def touch_token(self, token_id: str, used_ms: int) -> None:
        held = self._tokens.get(token_id)
        if held is not None:
            self._tokens[token_id] = msgspec.structs.replace(held, last_used_ms=used_ms)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None
