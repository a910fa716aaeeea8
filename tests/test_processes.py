"""Acceptance through real sidecar processes (started with `aforo-sidecar serve`):
64 concurrent clients, two processes sharing one Redis (one process on the embedded
store, which cannot be shared), exact counts at the end."""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx
import pytest

from tests.conftest import ADMIN, seed

pytestmark = pytest.mark.slow
CLIENTS = 64


def _process_env(url: str | None, prefix: str) -> dict[str, str]:
    # A generous deadline: this test is about exactness, not the fail mode.
    env = {"AFORO_DECISION_TIMEOUT_MS": "10000"}
    if url is not None:
        env.update({"AFORO_REDIS_URL": url, "AFORO_KEY_PREFIX": prefix})
    return env


async def _hammer(urls: list[str], total: int, path: str, body: dict) -> list[httpx.Response]:
    """``total`` POSTs of ``body`` to ``path`` from CLIENTS concurrent clients,
    round-robin over the sidecar processes."""
    remaining = iter(range(total))
    responses: list[httpx.Response] = []
    limits = httpx.Limits(max_connections=CLIENTS)
    async with httpx.AsyncClient(timeout=30, limits=limits) as http:

        async def client(n: int) -> None:
            for i in remaining:
                url = urls[(n + i) % len(urls)]
                responses.append(await http.post(f"{url}{path}", json=body))

        await asyncio.gather(*(client(n) for n in range(CLIENTS)))
    return responses


async def test_1000_per_day_through_sidecar_processes(backend_url, prefix, start_sidecar):
    env = _process_env(backend_url, prefix)
    processes = [start_sidecar(env) for _ in range(1 if backend_url is None else 2)]
    urls = [p.url for p in processes]
    async with httpx.AsyncClient(base_url=urls[0]) as admin:
        await seed(admin, windows={"day": 1000}, consumer_id="c1")

    responses = await _hammer(urls, 1500, "/v1/authorize", {"consumer_id": "c1", "product": "api"})

    statuses = Counter(r.status_code for r in responses)
    assert statuses == {200: 1000, 429: 500}
    for response in responses:
        if response.status_code == 429:
            assert int(response.headers["Retry-After"]) >= 1
            assert response.json()["reason"] == "quota_exceeded"
        assert response.json()["degraded"] is False
    async with httpx.AsyncClient(base_url=urls[-1]) as admin:
        view = (await admin.get("/v1/admin/consumers/c1", headers=ADMIN)).json()
    assert view["windows"] == {"day": 1000}


async def test_wallet_through_sidecar_processes(backend_url, prefix, start_sidecar):
    env = _process_env(backend_url, prefix)
    processes = [start_sidecar(env) for _ in range(1 if backend_url is None else 2)]
    urls = [p.url for p in processes]
    async with httpx.AsyncClient(base_url=urls[0]) as admin:
        await seed(admin, price=50_000, balance=10_000_000, consumer_id="w1")

    body = {"appId": "w1", "apiProduct": "api", "operation": "GET /x", "estimatedCost": 0.05}
    responses = await _hammer(urls, 250, "/integrations/apigee/authorize", body)

    assert Counter(r.status_code for r in responses) == {200: 200, 402: 50}
    assert all(r.json()["reason"] == "insufficient_balance" for r in responses if r.status_code == 402)
    async with httpx.AsyncClient(base_url=urls[-1]) as admin:
        view = (await admin.get("/v1/admin/consumers/w1", headers=ADMIN)).json()
    assert view["balance"] == 0 and view["pending"] == 10_000_000
