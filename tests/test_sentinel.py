"""Sidecar processes on a primary watched by Sentinel: the primary SIGKILLed under load
is replaced by its replica, and the pipelined connections and the redis-py pool follow
it without a restart."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from sidecar.store.base import StoreUnavailable
from sidecar.store.redis_store import RedisStore
from tests.conftest import ADMIN
from tests.decision_load import hammer, poll_readiness, steady_jobs
from tests.outage import check_applied_once, check_outage
from tests.redis_servers import free_port
from tests.test_redis_store import decision_call

pytestmark = pytest.mark.slow


async def test_the_primary_killed_under_load_is_followed_to_its_replica(
    private_sentinel, prefix, start_sidecar
):
    sentinel = private_sentinel
    consumers = [f"s{i}" for i in range(6)]
    # The 500 ms deadline: see the cluster failover test.
    env = {
        "AFORO_REDIS_URL": sentinel.url,
        "AFORO_KEY_PREFIX": prefix,
        "AFORO_FAIL_MODE": "closed",
        "AFORO_BREAKER_COOLDOWN_MS": "300",
        "AFORO_DECISION_TIMEOUT_MS": "500",
    }
    sidecars = [start_sidecar(env) for _ in range(2)]
    async with httpx.AsyncClient(base_url=sidecars[0].url, timeout=10) as http:
        plan = await http.put("/v1/admin/plans/big", json={"windows": {"day": 10_000_000}}, headers=ADMIN)
        assert plan.status_code == 201
        for consumer_id in consumers:
            body = {"plan_id": "big"}
            response = await http.put(f"/v1/admin/consumers/{consumer_id}", json=body, headers=ADMIN)
            assert response.status_code == 201

    end = time.monotonic() + 20
    load = asyncio.ensure_future(
        hammer([s.decision_port for s in sidecars], steady_jobs(consumers, end), clients=16)
    )
    readiness = asyncio.ensure_future(poll_readiness(sidecars[0].url, end))
    await asyncio.sleep(2)
    killed_at = time.monotonic()
    sentinel.primary.kill()
    answers, ready = await asyncio.gather(load, readiness)

    allowed = check_outage(answers, hit=consumers, spared=[], killed_at=killed_at)
    assert all(s == 200 for t, s in ready if t < killed_at)
    assert 503 in [s for t, s in ready if t > killed_at]
    assert ready[-1][1] == 200
    assert sentinel.current_primary() is sentinel.replica
    client = sentinel.replica.client()
    try:
        lost_or_ambiguous = check_applied_once(client, prefix, allowed, exact=[])
    finally:
        client.close()
    assert sum(lost_or_ambiguous.values()) <= 16, lost_or_ambiguous
    # The admin API (redis-py's Sentinel pool) follows the new primary too.
    async with httpx.AsyncClient(base_url=sidecars[1].url, timeout=10) as http:
        response = await http.post(f"/v1/admin/consumers/{consumers[0]}/suspend", json={}, headers=ADMIN)
        assert response.status_code == 200, response.text
        decision = await http.post("/v1/authorize", json={"consumer_id": consumers[0], "product": "api"})
        assert decision.json()["reason"] == "suspended"


async def test_no_sentinel_answering_is_the_fail_mode_not_a_hang(prefix):
    store = RedisStore(
        f"redis+sentinel://127.0.0.1:{free_port()},127.0.0.1:{free_port()}/mymaster", prefix=prefix
    )
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="no primary for 'mymaster'"):
            await store.decide(decision_call(deadline=time.monotonic() + 2))
        with pytest.raises(StoreUnavailable):
            await store.ping()
        assert time.monotonic() - started < 2
    finally:
        await store.close()
