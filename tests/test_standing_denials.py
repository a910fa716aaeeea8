"""Standing denials answered from a process's memory: the rules of what stands (pure),
and across two sidecar processes on one Redis: no Redis script for a remembered
denial, the same answer as Redis made, never an allow from memory, and every admin
change (plan, status, creation) seen by the very next decision in the other process."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
import redis

from sidecar.core.models import Outcome
from sidecar.standing_denials import ALL_CONSUMERS, StandingDenials
from tests.conftest import ADMIN
from tests.kong.harness import Sidecar

NONE5 = (None,) * 5


def _outcome(reason: str, used: tuple = NONE5, limits: tuple = NONE5, replayed: bool = False) -> Outcome:
    return Outcome(reason, 0, 100, "d1", 0, used, limits, replayed)


RESETS = (60_000, 3_600_000, 86_400_000, 604_800_000, 2_592_000_000)


def test_what_stands_is_remembered_and_nothing_else():
    memory = StandingDenials()
    memory.learn("t", "a", "api", _outcome("suspended"), RESETS)
    assert memory.recall("t", "a", "api", 0) is None  # not live: never remembered
    memory.live = True
    for reason in ("suspended", "revoked", "unknown_consumer"):
        memory.learn("t", reason, "api", _outcome(reason), RESETS)
        assert memory.recall("t", reason, "other-product", 10**12).reason == reason  # any product, no end
    for reason in ("ok", "insufficient_balance", "product_not_allowed", "expired"):
        memory.learn("t", reason, "api", _outcome(reason), RESETS)
        assert memory.recall("t", reason, "api", 0) is None
    memory.learn("t", "replay", "api", _outcome("suspended", replayed=True), RESETS)
    assert memory.recall("t", "replay", "api", 0) is None


def test_a_quota_denial_stands_only_for_a_window_used_to_its_limit_until_its_reset():
    memory = StandingDenials()
    memory.live = True
    # 8 of 10 used: a call of 5 is refused, one of 2 would fit: not remembered.
    memory.learn(
        "t", "a", "api", _outcome("quota_exceeded", (8, None, None, None, None), (10, *NONE5[1:])), RESETS
    )
    assert memory.recall("t", "a", "api", 0) is None
    # The day used up (the minute not): until the day's reset, for this product only.
    full = _outcome("quota_exceeded", (3, None, 100, None, None), (10, None, 100, None, None))
    memory.learn("t", "a", "api", full, RESETS)
    assert memory.recall("t", "a", "api", RESETS[2] - 1) == full
    assert memory.recall("t", "a", "other", 0) is None
    assert memory.recall("t", "a", "api", RESETS[2]) is None and len(memory) == 0


def test_an_invalidation_forgets_a_consumer_or_a_whole_tenant():
    memory = StandingDenials()
    memory.live = True
    for tenant, consumer in (("t", "a"), ("t", "b"), ("u", "a")):
        memory.learn(tenant, consumer, "api", _outcome("suspended"), RESETS)
    memory.forget("t", "a")
    assert memory.recall("t", "a", "api", 0) is None and memory.recall("t", "b", "api", 0) is not None
    memory.forget("t", ALL_CONSUMERS)
    assert memory.recall("t", "b", "api", 0) is None and memory.recall("u", "a", "api", 0) is not None


# --- two processes ------------------------------------------------------------------


@pytest.fixture
def pair(private_redis, prefix: str, tmp_path) -> Iterator[tuple[Sidecar, Sidecar]]:
    # A Redis of their own: its script count is theirs alone.
    env = {"AFORO_REDIS_URL": private_redis.url, "AFORO_KEY_PREFIX": prefix}
    a = Sidecar(str(tmp_path), env, grpc=False).start()
    b = Sidecar(str(tmp_path), env, grpc=False).start()
    yield a, b
    a.stop()
    b.stop()


def _decide(sidecar: Sidecar, consumer: str, **fields) -> dict:
    body = {"consumer_id": consumer, "product": "api", **fields}
    return httpx.post(f"{sidecar.decision_url}/v1/authorize", json=body, timeout=10).json()


def _remembered(sidecar: Sidecar) -> float:
    for line in httpx.get(f"{sidecar.url}/metrics", timeout=10).text.splitlines():
        if line.startswith("aforo_standing_denials_total "):
            return float(line.split()[1])
    return 0.0


def _scripts(redis_url: str) -> int:
    return int(
        redis.Redis.from_url(redis_url).info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
    )


def _admin(sidecar: Sidecar, method: str, path: str, body: dict | None = None) -> httpx.Response:
    response = httpx.request(method, f"{sidecar.url}{path}", json=body or {}, headers=ADMIN, timeout=10)
    assert response.status_code in (200, 201), response.text
    return response


def _from_memory(sidecar: Sidecar, consumer: str) -> dict:
    """A decision ``sidecar`` answered from memory (waiting for its subscription)."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        before = _remembered(sidecar)
        answer = _decide(sidecar, consumer)
        if _remembered(sidecar) > before:
            return answer
        time.sleep(0.05)
    raise AssertionError(f"{consumer}'s denial was never answered from memory")


async def _many(sidecar: Sidecar, consumer: str, count: int) -> list[dict]:
    async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=64)) as http:
        body = {"consumer_id": consumer, "product": "api"}
        answers = await asyncio.gather(
            *(http.post(f"{sidecar.decision_url}/v1/authorize", json=body) for _ in range(count))
        )
    return [a.json() for a in answers]


def test_standing_denials_across_two_processes(pair, private_redis):
    redis_url = private_redis.url
    a, b = pair
    _admin(a, "PUT", "/v1/admin/plans/daily", {"windows": {"day": 3}})
    for consumer in ("c1", "c2"):
        _admin(a, "PUT", f"/v1/admin/consumers/{consumer}", {"plan_id": "daily", "wallet_mode": "postpaid"})

    # c1 uses its day up through b; the denial Redis makes is then remembered by b.
    assert [_decide(b, "c1")["allow"] for _ in range(3)] == [True] * 3
    made = _decide(b, "c1")
    assert made["reason"] == "quota_exceeded"
    remembered = _from_memory(b, "c1")
    same = ("allow", "reason", "status", "consumer_id", "windows", "balance")
    assert {k: remembered.get(k) for k in same} == {k: made.get(k) for k in same}
    assert abs(remembered["ttl_seconds"] - made["ttl_seconds"]) <= 1
    assert remembered["decision_id"] != made["decision_id"]
    # No Redis script for remembered denials, and never an allow: 64 at once, all denied.
    scripts = _scripts(redis_url)
    answers = asyncio.run(_many(b, "c1", 200))
    assert {x["reason"] for x in answers} == {"quota_exceeded"}
    assert _scripts(redis_url) == scripts
    # A call with a request id goes to Redis (an id allowed before could replay its allow).
    assert _decide(b, "c1", request_id=f"r-{uuid.uuid4().hex}")["reason"] == "quota_exceeded"
    assert _scripts(redis_url) == scripts + 1

    # A plan change made through a: b's very next decision sees it.
    _admin(a, "PUT", "/v1/admin/plans/daily", {"windows": {"day": 5}})
    assert _decide(b, "c1")["allow"] is True

    # Suspended through a, remembered by b; resumed through a: b's very next call is allowed.
    _admin(a, "POST", "/v1/admin/consumers/c2/suspend")
    assert _decide(b, "c2")["reason"] == "suspended"
    assert _from_memory(b, "c2")["reason"] == "suspended"
    _admin(a, "POST", "/v1/admin/consumers/c2/resume")
    assert _decide(b, "c2")["allow"] is True

    # Unknown to b (remembered), then created through a: allowed at once.
    assert _decide(b, "c3")["reason"] == "unknown_consumer"
    assert _from_memory(b, "c3")["reason"] == "unknown_consumer"
    _admin(a, "PUT", "/v1/admin/consumers/c3", {"plan_id": "daily", "wallet_mode": "postpaid"})
    assert _decide(b, "c3")["allow"] is True
