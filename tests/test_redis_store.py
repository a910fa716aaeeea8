"""Properties of the Redis store that only Redis has: the key layout, the scripts, the
late-apply guard; on one Redis, a cluster and a Sentinel set."""

from __future__ import annotations

import asyncio
import time

from redis.crc import key_slot

from sidecar.core.clock import now_ms
from sidecar.core.decision import new_decision_id
from sidecar.core.models import ConsumerSpec, Plan
from sidecar.core.windows import all_bounds
from sidecar.store.base import DecisionCall, StoreUnavailable
from sidecar.store.redis_store import RedisStore


def decision_call(**overrides) -> DecisionCall:
    moment = now_ms()
    bounds = all_bounds(moment)
    values = {
        "tenant": "default",
        "consumer_id": "c1",
        "key_hash": None,
        "product": "api",
        "operation": "GET /x",
        "cost": None,
        "hits": 1,
        "request_id": "r-1",
        "decision_id": new_decision_id(moment),
        "now_ms": moment,
        "window_starts_ms": tuple(s for s, _ in bounds),
        "resets_ms": tuple(r for _, r in bounds),
        "idempotency_ttl_ms": 60_000,
        "apply_by_ms": 0,
    }
    values.update(overrides)
    return DecisionCall(**values)


async def _store(url: str, prefix: str) -> RedisStore:
    store = RedisStore(url, prefix=prefix)
    await store.load_scripts()
    await store.put_plan(Plan(id="p", windows={"minute": 5, "day": 10, "month": 100}, price=7).validated())
    await store.put_consumer(ConsumerSpec(id="c1", plan_id="p").validated(), now_ms())
    await store.top_up("default", "c1", 1_000, "ref-1")
    return store


async def test_every_key_of_a_consumer_lives_in_one_cluster_slot(deployment_url, prefix):
    store = await _store(deployment_url, prefix)
    try:
        outcome = await store.decide(decision_call())
        assert outcome.reason == "ok"
        keys = [k.decode() async for k in store.client.scan_iter(match=f"{prefix}{{default:c1}}*")]
        # consumer hash, request record, usage stream, 3 window counters, top-up reference
        assert len(keys) == 7
        assert len({key_slot(k.encode()) for k in keys}) == 1
    finally:
        await store.close()


async def test_a_decision_arriving_after_its_deadline_is_discarded_unapplied(deployment_url, prefix):
    store = await _store(deployment_url, prefix)
    try:
        late = decision_call(apply_by_ms=now_ms() - 1)
        try:
            await store.decide(late)
        except StoreUnavailable as exc:
            assert "after its deadline" in str(exc)
        else:
            raise AssertionError("a late decision was applied")
        view = await store.get_consumer("default", "c1", now_ms())
        assert view is not None
        assert (view.windows, view.balance) == ({"minute": 0, "day": 0, "month": 0}, 1_000)
        assert await store.usage("default", "c1") == []
        # In time, the same request applies once.
        on_time = await store.decide(decision_call(apply_by_ms=now_ms() + 60_000))
        assert (on_time.reason, on_time.balance) == ("ok", 993)
    finally:
        await store.close()


async def test_scripts_survive_a_script_flush(deployment_url, prefix):
    # EVALSHA falls back to loading the script again (e.g. after a Redis restart).
    store = await _store(deployment_url, prefix)
    try:
        await store.client.script_flush()
        outcome = await store.decide(decision_call(request_id="r-2"))
        assert outcome.reason == "ok" and outcome.used[0] == 1
        # Again once the pipelined connection is up: the hot path reloads and re-sends.
        await store.client.script_flush()
        outcome = await store.decide(decision_call(request_id="r-3"))
        assert outcome.reason == "ok" and outcome.used[0] == 2
    finally:
        await store.close()


async def test_a_plan_edit_reaches_bound_consumers_and_not_others(deployment_url, prefix):
    store = await _store(deployment_url, prefix)
    try:
        await store.put_plan(Plan(id="q", windows={"day": 1}).validated())
        await store.put_consumer(ConsumerSpec(id="c2", plan_id="q").validated(), now_ms())
        await store.put_plan(Plan(id="p", windows={"day": 1}, price=7).validated())
        first = await store.decide(decision_call(request_id="a"))
        second = await store.decide(decision_call(request_id="b"))
        assert (first.reason, second.reason) == ("ok", "quota_exceeded")
        assert first.limits == (None, None, 1, None, None)
        # Moving c1 to plan q leaves p's member set; a later edit of p no longer applies.
        await store.put_consumer(ConsumerSpec(id="c1", plan_id="q").validated(), now_ms())
        await store.put_plan(Plan(id="p", windows={"day": 50}).validated())
        third = await store.decide(decision_call(request_id="c"))
        assert third.limits == (None, None, 1, None, None)
    finally:
        await store.close()


async def test_a_burst_past_the_pool_waits_for_a_connection_and_a_long_wait_is_unavailable(
    private_redis, prefix
):
    # Standalone: 4 connections, 200 admin-side calls at once all succeed (they wait);
    # a redis-py pool without a wait failed 27 of them.
    store = RedisStore(private_redis.url, prefix=prefix, max_connections=4, socket_timeout_s=0.5)
    try:
        await store.put_plan(Plan(id="p", tenant="t1"))
        answers = await asyncio.gather(*(store.resolve_key("t1", "a" * 64) for _ in range(200)))
        assert answers == [None] * 200
        # Redis frozen: the calls holding the connections time out, and those waiting for
        # one give up after the socket timeout too: all unavailable, none hangs.
        private_redis.freeze()
        try:
            started = time.monotonic()
            failed = await asyncio.gather(
                *(store.resolve_key("t1", "a" * 64) for _ in range(8)), return_exceptions=True
            )
            assert all(isinstance(f, StoreUnavailable) for f in failed), failed
            assert time.monotonic() - started < 5
        finally:
            private_redis.thaw()
        assert await store.resolve_key("t1", "a" * 64) is None
    finally:
        await store.close()
