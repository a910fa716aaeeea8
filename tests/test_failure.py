"""Redis failing under a running sidecar: killed, frozen, back again.

Each test runs a private redis-server (its own port) so it can be stopped without
touching the shared one, and a real sidecar process in front of it.
"""

from __future__ import annotations

import time
from collections import Counter

import httpx
import pytest

from tests.conftest import ADMIN, PrivateRedis

pytestmark = pytest.mark.slow
# Every request is answered by the 50 ms decision deadline while Redis is gone, not by a
# socket timeout (seconds). The bound leaves room for a 2-core CI box's scheduling noise
# (one answer took 132 ms there): it proves the deadline cut in, it does not time speed.
BUDGET_S = 0.250


def _env(server: PrivateRedis, fail_mode: str) -> dict[str, str]:
    return {
        "AFORO_REDIS_URL": server.url,
        "AFORO_FAIL_MODE": fail_mode,
        "AFORO_DECISION_TIMEOUT_MS": "50",
        "AFORO_BREAKER_COOLDOWN_MS": "300",
        "AFORO_LATE_APPLY_MARGIN_MS": "200",
    }


def _seed(http: httpx.Client, limit: int) -> None:
    assert http.put("/v1/admin/plans/p", json={"windows": {"day": limit}}, headers=ADMIN).status_code == 201
    assert http.put("/v1/admin/consumers/c1", json={"plan_id": "p"}, headers=ADMIN).status_code == 201


def _timed_decisions(http: httpx.Client, count: int) -> list[tuple[float, httpx.Response]]:
    results = []
    for _ in range(count):
        started = time.perf_counter()
        response = http.post("/v1/authorize", json={"consumer_id": "c1", "product": "api"})
        results.append((time.perf_counter() - started, response))
    return results


def _wait_until_exact(http: httpx.Client) -> None:
    """Past the breaker's cooldown, a decision reaches Redis again."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if http.get("/readyz").status_code != 503:
            time.sleep(0.4)  # the breaker cooldown
            return
        time.sleep(0.05)
    raise AssertionError("sidecar never saw Redis again")


def _day_count(http: httpx.Client) -> int:
    return http.get("/v1/admin/consumers/c1", headers=ADMIN).json()["windows"]["day"]


@pytest.mark.parametrize("outage", ["killed", "frozen"])
def test_fail_open_answers_allow_degraded_within_budget(private_redis, start_sidecar, outage):
    sidecar = start_sidecar(_env(private_redis, "open"))
    with httpx.Client(base_url=sidecar.url, timeout=5) as http:
        _seed(http, limit=20)
        before = _timed_decisions(http, 5)
        assert [r.status_code for _, r in before] == [200] * 5

        private_redis.kill() if outage == "killed" else private_redis.freeze()
        during = _timed_decisions(http, 40)
        for elapsed, response in during:
            body = response.json()
            assert response.status_code == 200
            assert (body["allow"], body["degraded"], body["reason"]) == (True, True, "store_unavailable")
            assert elapsed < BUDGET_S, f"answered in {elapsed * 1000:.1f} ms"
        assert http.get("/readyz").status_code == 503
        metrics = http.get("/metrics").text
        assert 'aforo_decisions_total{reason="store_unavailable"} 40.0' in metrics

        if outage == "killed":
            private_redis.start()  # a fresh, empty Redis on the same port
            _wait_until_exact(http)
            _seed(http, limit=20)
            expected_allowed = 20
        else:
            # Frozen for longer than the deadline plus the late-apply margin: whatever
            # the frozen Redis received must be discarded, not counted, on waking up.
            time.sleep(0.5)
            private_redis.thaw()
            _wait_until_exact(http)
            expected_allowed = 15
        after = _timed_decisions(http, 25)
        reasons = Counter(r.json()["reason"] for _, r in after)
        assert reasons == {"ok": expected_allowed, "quota_exceeded": 25 - expected_allowed}
        assert not any(r.json()["degraded"] for _, r in after)
        assert _day_count(http) == 20


@pytest.mark.parametrize("outage", ["killed", "frozen"])
def test_fail_closed_answers_503(private_redis, start_sidecar, outage):
    sidecar = start_sidecar(_env(private_redis, "closed"))
    with httpx.Client(base_url=sidecar.url, timeout=5) as http:
        _seed(http, limit=10)
        assert http.post("/v1/authorize", json={"consumer_id": "c1", "product": "api"}).status_code == 200

        private_redis.kill() if outage == "killed" else private_redis.freeze()
        during = _timed_decisions(http, 30)
        for elapsed, response in during:
            body = response.json()
            assert response.status_code == 503
            assert (body["allow"], body["degraded"], body["reason"]) == (False, True, "store_unavailable")
            assert response.headers["Retry-After"] == "1"
            assert elapsed < BUDGET_S, f"answered in {elapsed * 1000:.1f} ms"
        if outage == "killed":
            # Admin writes fail cleanly too, with a machine-readable code. (Against a
            # frozen Redis a write may still run when it wakes: the 503 says so.)
            response = http.post("/v1/admin/consumers/c1/suspend", json={}, headers=ADMIN)
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "store_unavailable"

        if outage == "frozen":
            time.sleep(0.5)
            private_redis.thaw()
            _wait_until_exact(http)
            after = _timed_decisions(http, 12)
            assert Counter(r.json()["reason"] for _, r in after) == {"ok": 9, "quota_exceeded": 3}
            assert _day_count(http) == 10


def test_decisions_recover_under_continuous_traffic(private_redis, start_sidecar):
    """Fail-mode answers given while the breaker is open must not keep it open: with
    traffic flowing the whole time, decisions become exact again once Redis is back."""
    sidecar = start_sidecar(_env(private_redis, "open"))
    with httpx.Client(base_url=sidecar.url, timeout=5) as http:
        _seed(http, limit=1000)
        private_redis.kill()
        degraded = _timed_decisions(http, 20)
        assert all(r.json()["degraded"] for _, r in degraded)
        private_redis.start()  # empty: seed again
        _seed(http, limit=1000)
        deadline = time.monotonic() + 5
        exact = 0
        while time.monotonic() < deadline and exact < 20:
            response = http.post("/v1/authorize", json={"consumer_id": "c1", "product": "api"})
            exact = exact + 1 if not response.json()["degraded"] else 0
            time.sleep(0.01)
        assert exact == 20, "decisions stayed degraded while traffic kept flowing"


def test_api_key_decisions_fall_back_to_the_fail_mode_too(private_redis, start_sidecar):
    """A key whose owner is cached goes straight to the decision; one that is not needs
    a lookup first. Either way a frozen Redis gives a fail-mode answer in budget."""
    sidecar = start_sidecar(_env(private_redis, "closed"))
    with httpx.Client(base_url=sidecar.url, timeout=5) as http:
        _seed(http, limit=10)
        cached, fresh = (
            http.post("/v1/admin/consumers/c1/keys", json={}, headers=ADMIN).json()["api_key"]
            for _ in range(2)
        )
        first = http.post("/v1/authorize", json={"api_key": cached, "product": "api"})
        assert (first.status_code, first.json()["consumer_id"]) == (200, "c1")

        private_redis.freeze()
        for key in (fresh, cached, fresh):
            started = time.perf_counter()
            response = http.post("/v1/authorize", json={"api_key": key, "product": "api"})
            elapsed = time.perf_counter() - started
            assert response.status_code == 503
            assert (response.json()["reason"], response.json()["degraded"]) == ("store_unavailable", True)
            assert elapsed < BUDGET_S, f"answered in {elapsed * 1000:.1f} ms"

        time.sleep(0.5)
        private_redis.thaw()
        _wait_until_exact(http)
        after = http.post("/v1/authorize", json={"api_key": fresh, "product": "api"})
        assert (after.status_code, after.json()["consumer_id"]) == (200, "c1")
        assert _day_count(http) == 2
