"""Exactness under concurrency, on both stores, through the authorizer (the code path
every transport uses). Counts and money are asserted to the unit."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from datetime import UTC, datetime

from sidecar.authorizer import Authorizer
from sidecar.core.models import AuthorizeRequest, ConsumerSpec, Plan
from sidecar.store.base import Store
from tests.conftest import make_settings

CONCURRENCY = 64


async def setup(store: Store, plan: Plan, consumer: str = "c1", balance: int = 0) -> None:
    await store.put_plan(plan.validated())
    await store.put_consumer(ConsumerSpec(id=consumer, plan_id=plan.id).validated(), 0)
    if balance:
        await store.top_up("default", consumer, balance, None)


async def run_concurrently(calls, concurrency: int = CONCURRENCY):
    """Run the coroutine factories in ``calls`` with at most ``concurrency`` in flight."""
    queue = list(calls)
    results = []

    async def worker():
        while queue:
            results.append(await queue.pop()())

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


async def test_daily_quota_is_exact_under_concurrency(store: Store):
    await setup(store, Plan(id="daily", windows={"day": 1000}))
    authorizer = Authorizer(store, make_settings())
    request = AuthorizeRequest(consumer_id="c1", product="api").validated()
    decisions = await run_concurrently([lambda: authorizer.authorize(request)] * 1500)
    reasons = Counter(d.reason for d in decisions)
    assert reasons == {"ok": 1000, "quota_exceeded": 500}
    assert not any(d.degraded for d in decisions)
    assert all(d.retry_after and d.retry_after >= 1 for d in decisions if not d.allow)
    view = await store.get_consumer("default", "c1", _now())
    assert view is not None and view.windows == {"day": 1000}
    assert len(await store.usage("default", "c1")) == 1000


async def test_wallet_drains_to_exactly_zero(store: Store):
    # 10.00 at 0.05 a call: 200 calls, then 402, balance exactly 0.
    await setup(store, Plan(id="paid", price=50_000), balance=10_000_000)
    authorizer = Authorizer(store, make_settings())
    request = AuthorizeRequest(consumer_id="c1", product="api").validated()
    decisions = await run_concurrently([lambda: authorizer.authorize(request)] * 260)
    reasons = Counter(d.reason for d in decisions)
    assert reasons == {"ok": 200, "insufficient_balance": 60}
    assert all(d.status == 402 for d in decisions if d.reason == "insufficient_balance")
    assert sum(d.charged for d in decisions) == 10_000_000
    view = await store.get_consumer("default", "c1", _now())
    assert view is not None and view.balance == 0 and view.pending == 10_000_000
    after = await authorizer.authorize(request)
    assert (after.reason, after.status, after.balance) == ("insufficient_balance", 402, 0)


async def test_request_cost_overrides_the_plan_price_exactly(store: Store):
    await setup(store, Plan(id="paid", price=50_000), balance=1_000_000)
    authorizer = Authorizer(store, make_settings())
    costs = [1, 7, 333, 12_345] * 20
    decisions = await run_concurrently(
        [
            lambda c=c: authorizer.authorize(
                AuthorizeRequest(consumer_id="c1", product="api", cost=c).validated()
            )
            for c in costs
        ]
    )
    assert all(d.allow for d in decisions)
    view = await store.get_consumer("default", "c1", _now())
    assert view is not None and view.balance == 1_000_000 - sum(costs)


async def test_retried_request_ids_count_and_charge_once_under_concurrency(store: Store):
    await setup(store, Plan(id="both", windows={"day": 1000}, price=10_000), balance=5_000_000)
    authorizer = Authorizer(store, make_settings())
    ids = [f"req-{uuid.uuid4().hex[:8]}" for _ in range(50)]
    # Every request id sent 8 times, all at once, interleaved.
    calls = [
        lambda rid=rid: authorizer.authorize(
            AuthorizeRequest(consumer_id="c1", product="api", request_id=rid).validated()
        )
        for rid in ids
        for _ in range(8)
    ]
    decisions = await run_concurrently(calls)
    assert len(decisions) == 400 and all(d.allow for d in decisions)
    by_request: dict[str, set[str]] = {}
    for d in decisions:
        by_request.setdefault(d.request_id, set()).add(d.decision_id)
    # Each request id got one decision, returned to all 8 of its attempts.
    assert all(len(decision_ids) == 1 for decision_ids in by_request.values())
    assert sum(d.replayed for d in decisions) == 350
    view = await store.get_consumer("default", "c1", _now())
    assert view is not None
    assert view.windows == {"day": 50}
    assert view.balance == 5_000_000 - 50 * 10_000
    usage = await store.usage("default", "c1")
    assert sorted(r.request_id for r in usage) == sorted(ids)


async def test_a_replayed_request_id_returns_its_first_decision_later(store: Store):
    await setup(store, Plan(id="p", windows={"day": 10}, price=100), balance=1_000)
    authorizer = Authorizer(store, make_settings())
    request = AuthorizeRequest(consumer_id="c1", product="api", request_id="r-1").validated()
    first = await authorizer.authorize(request)
    await authorizer.authorize(AuthorizeRequest(consumer_id="c1", product="api").validated())
    again = await authorizer.authorize(request)
    assert again.replayed and not first.replayed
    assert (again.decision_id, again.balance, again.windows) == (
        first.decision_id,
        first.balance,
        first.windows,
    )
    view = await store.get_consumer("default", "c1", _now())
    assert view is not None and view.windows == {"day": 2} and view.balance == 800


async def test_denied_calls_consume_nothing_in_any_window(store: Store):
    # The minute window is exhausted; the day window must not move on denials.
    await setup(store, Plan(id="p", windows={"minute": 3, "day": 100}, price=10), balance=1_000)
    authorizer = Authorizer(store, make_settings())
    request = AuthorizeRequest(consumer_id="c1", product="api").validated()
    decisions = await run_concurrently([lambda: authorizer.authorize(request)] * 40, concurrency=16)
    assert Counter(d.reason for d in decisions) == {"ok": 3, "quota_exceeded": 37}
    view = await store.get_consumer("default", "c1", _now())
    assert view is not None
    assert view.windows == {"minute": 3, "day": 3}
    assert view.balance == 1_000 - 30


async def test_a_call_at_the_day_edge_counts_in_its_own_day(store: Store):
    await setup(store, Plan(id="p", windows={"day": 1}))
    authorizer = Authorizer(store, make_settings())
    request = AuthorizeRequest(consumer_id="c1", product="api").validated()
    # Tomorrow's last millisecond and the day after's first (counters expire after
    # their window, so the moments must lie ahead of the real clock).
    first_ms = (_now() // 86_400_000 + 2) * 86_400_000
    last_ms = first_ms - 1
    assert (await authorizer.authorize(request, at_ms=last_ms)).allow
    denied = await authorizer.authorize(request, at_ms=last_ms)
    assert denied.reason == "quota_exceeded" and denied.retry_after == 1
    assert (await authorizer.authorize(request, at_ms=first_ms)).allow


async def test_a_multi_window_denial_waits_for_the_latest_reset(store: Store):
    await setup(store, Plan(id="p", windows={"minute": 1, "hour": 1}))
    authorizer = Authorizer(store, make_settings())
    request = AuthorizeRequest(consumer_id="c1", product="api").validated()
    at = (_now() // 3_600_000 + 1) * 3_600_000 + 30_000  # 30 s into the next hour
    assert (await authorizer.authorize(request, at_ms=at)).allow
    denied = await authorizer.authorize(request, at_ms=at)
    # Both windows are exhausted: only the hour's reset lets a call through.
    assert denied.retry_after == 3600 - 30
    assert denied.ttl_seconds == 60  # capped by quota_ttl_cap_seconds
    assert {w.window: w.remaining for w in denied.windows} == {"minute": 0, "hour": 0}


def _now() -> int:
    return int(datetime.now(tz=UTC).timestamp() * 1000)
