"""Listing and deleting plans and consumers through the admin API, on the embedded
store and on Redis in each topology: pages in a stable order, filters, deletions that
take effect on the very next decision, and nothing left behind that could authorize."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import httpx
import pytest

from sidecar.core.clock import now_ms
from sidecar.store.base import Store
from sidecar.store.redis_store import RedisStore
from tests.conftest import ADMIN, seed
from tests.test_api import assert_error, assert_no_consumer, redis_keys


async def _put(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> None:
    response = await client.put(path, json=body, headers=ADMIN)
    assert response.status_code in (200, 201), response.text


async def _all_pages(client: httpx.AsyncClient, path: str, **params: Any) -> list[dict[str, Any]]:
    """Every item of a listing, page after page; checks each page's shape."""
    items: list[dict[str, Any]] = []
    cursor = None
    for _ in range(100):
        query = {**params, **({"cursor": cursor} if cursor else {})}
        response = await client.get(path, params=query, headers=ADMIN)
        assert response.status_code == 200, response.text
        page = response.json()
        assert set(page) == {"items", "next_cursor"}
        assert len(page["items"]) <= int(params.get("limit", 100))
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items
    raise AssertionError("the pages never ended")


async def _decide(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await client.post("/v1/authorize", json={"product": "api", **body})
    return response.json()


async def test_consumers_list_in_pages_in_id_order_with_filters(client: httpx.AsyncClient) -> None:
    await _put(client, "/v1/admin/plans/gold", {"windows": {"day": 10}})
    await _put(client, "/v1/admin/plans/free", {"windows": {"day": 5}})
    await _put(client, "/v1/admin/plans/gold", {"windows": {"day": 10}, "tenant": "acme"})
    ids = [f"app-{i:02d}" for i in range(23)]
    for i, consumer_id in enumerate(ids):
        await _put(client, f"/v1/admin/consumers/{consumer_id}", {"plan_id": "gold" if i % 3 else "free"})
    for consumer_id in ids[:5]:
        assert (
            await client.post(f"/v1/admin/consumers/{consumer_id}/suspend", headers=ADMIN)
        ).status_code == 200
    await _put(client, "/v1/admin/consumers/other-tenant", {"plan_id": "gold", "tenant": "acme"})

    everyone = await _all_pages(client, "/v1/admin/consumers", limit=7)
    assert [c["id"] for c in everyone] == ids  # every consumer once, in id order
    assert everyone[0]["windows"] == {"day": 0} and "balance" in everyone[0]
    gold = await _all_pages(client, "/v1/admin/consumers", limit=4, plan_id="gold")
    assert [c["id"] for c in gold] == [c for i, c in enumerate(ids) if i % 3]
    suspended_free = await _all_pages(
        client, "/v1/admin/consumers", limit=2, plan_id="free", status="suspended"
    )
    assert [c["id"] for c in suspended_free] == ["app-00", "app-03"]
    acme = await _all_pages(client, "/v1/admin/consumers", tenant="acme")
    assert [(c["tenant"], c["id"]) for c in acme] == [("acme", "other-tenant")]
    plans = await _all_pages(client, "/v1/admin/plans", limit=1)
    assert [p["id"] for p in plans] == ["free", "gold"]
    assert (await _all_pages(client, "/v1/admin/plans", tenant="nobody")) == []


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"cursor": "%%%"}, "cursor"),
        ({"status": "asleep"}, "status"),
        ({"plan_id": "bad plan"}, "plan_id"),
        ({"tenant": "a:b"}, "tenant"),
    ],
)
async def test_bad_list_parameters_are_refused(client: httpx.AsyncClient, params, field) -> None:
    response = await client.get("/v1/admin/consumers", params=params, headers=ADMIN)
    code = "invalid_identifier" if field in ("plan_id", "tenant") else "invalid_request"
    assert_error(response, 400, code, field)


async def test_listing_needs_the_admin_token(client: httpx.AsyncClient) -> None:
    for path in ("/v1/admin/consumers", "/v1/admin/plans", "/v1/admin/consumers/c1/keys"):
        assert_error(await client.get(path), 401, "unauthorized")


async def test_a_deleted_consumer_stops_deciding_at_once_and_its_keys_stop_resolving(
    client: httpx.AsyncClient, store: Store
) -> None:
    await seed(client, windows={"day": 100}, price=10, balance=1_000, consumer_id="c1")
    created = await client.post("/v1/admin/consumers/c1/keys", json={}, headers=ADMIN)
    raw = created.json()["api_key"]
    keys = (await client.get("/v1/admin/consumers/c1/keys", headers=ADMIN)).json()
    assert [k["key_hash"] for k in keys["keys"]] == [created.json()["key_hash"]]
    assert keys["keys"][0]["created_at"].endswith("+00:00") and keys["keys"][0]["last_used_at"] is None
    # The key's owner is now cached in the process: the deletion must beat the cache.
    assert (await _decide(client, api_key=raw))["reason"] == "ok"
    assert (await _decide(client, consumer_id="c1", request_id="before"))["reason"] == "ok"

    deleted = await client.delete("/v1/admin/consumers/c1", headers=ADMIN)
    assert (deleted.status_code, deleted.json()) == (200, {"deleted": True, "tenant": "default", "id": "c1"})
    assert (await _decide(client, consumer_id="c1"))["reason"] == "unknown_consumer"
    assert (await _decide(client, api_key=raw))["reason"] == "invalid_key"
    assert_error(await client.get("/v1/admin/consumers/c1", headers=ADMIN), 404, "consumer_not_found")
    assert_error(await client.get("/v1/admin/consumers/c1/keys", headers=ADMIN), 404, "consumer_not_found")
    assert_error(await client.delete("/v1/admin/consumers/c1", headers=ADMIN), 404, "consumer_not_found")
    assert await _all_pages(client, "/v1/admin/consumers") == []
    # Usage not yet drained is kept for billing; nothing that could decide is.
    assert [r.request_id for r in await store.usage("default", "c1")][-1] == "before"
    assert await store.get_consumer("default", "c1", now_ms()) is None
    assert [k for k in await redis_keys(store) if ":key:" in k] == []

    # The same id created again is a new consumer: empty windows, no keys.
    await seed(client, windows={"day": 100}, consumer_id="c1", plan_id="plan2")
    again = await _decide(client, consumer_id="c1")
    assert (again["reason"], again["windows"][0]["remaining"]) == ("ok", 99)
    assert (await client.get("/v1/admin/consumers/c1/keys", headers=ADMIN)).json()["keys"] == []
    assert (await _decide(client, api_key=raw))["reason"] == "invalid_key"


async def test_decisions_racing_a_deletion_are_each_counted_or_refused(
    client: httpx.AsyncClient, store: Store
) -> None:
    """64 clients deciding while the consumer is deleted: every call answered before
    the deletion is counted (one usage record each), every one after is refused."""
    await seed(client, windows={"day": 100_000}, consumer_id="c1")
    stop = asyncio.Event()
    answers: list[str] = []

    async def decide_until_stopped(n: int) -> None:
        i = 0
        while not stop.is_set():
            answers.append((await _decide(client, consumer_id="c1", request_id=f"r{n}-{i}"))["reason"])
            i += 1
            await asyncio.sleep(0)  # the embedded store answers without ever suspending

    workers = [asyncio.create_task(decide_until_stopped(n)) for n in range(64)]
    await asyncio.sleep(0.3)
    assert (await client.delete("/v1/admin/consumers/c1", headers=ADMIN)).status_code == 200
    after = len(answers)
    await asyncio.sleep(0.2)
    stop.set()
    await asyncio.gather(*workers)
    reasons = Counter(answers)
    assert set(reasons) == {"ok", "unknown_consumer"} and reasons["unknown_consumer"] >= 1
    assert "ok" not in answers[after + 64 :]  # at most the calls in flight at the deletion
    assert len(await store.usage("default", "c1")) == reasons["ok"]


async def test_a_plan_is_deleted_only_once_no_consumer_is_bound(
    client: httpx.AsyncClient, store: Store
) -> None:
    await seed(client, windows={"day": 10}, consumer_id="c1", plan_id="gold")
    refused = await client.delete("/v1/admin/plans/gold", headers=ADMIN)
    assert_error(refused, 409, "plan_in_use")
    assert (await client.get("/v1/admin/plans/gold", headers=ADMIN)).status_code == 200
    assert (await _decide(client, consumer_id="c1"))["reason"] == "ok"
    assert (await client.delete("/v1/admin/consumers/c1", headers=ADMIN)).status_code == 200
    deleted = await client.delete("/v1/admin/plans/gold", headers=ADMIN)
    assert (deleted.status_code, deleted.json()["id"]) == (200, "gold")
    assert_error(await client.get("/v1/admin/plans/gold", headers=ADMIN), 404, "plan_not_found")
    assert_error(await client.delete("/v1/admin/plans/gold", headers=ADMIN), 404, "plan_not_found")
    assert await _all_pages(client, "/v1/admin/plans") == []
    response = await client.put("/v1/admin/consumers/c2", json={"plan_id": "gold"}, headers=ADMIN)
    assert_error(response, 404, "plan_not_found")
    await assert_no_consumer(store, "c2")


async def test_a_tenant_larger_than_the_connection_pool_is_listed_and_pruned(client, store):
    """Listing and pruning read one key per consumer: never one pooled connection each
    (redis-py refuses past its cap of 256 instead of waiting)."""
    await _put(client, "/v1/admin/plans/p", {"windows": {"day": 10}})
    gate = asyncio.Semaphore(32)

    async def put(i: int) -> None:
        async with gate:
            await _put(client, f"/v1/admin/consumers/c{i:03d}", {"plan_id": "p"})

    await asyncio.gather(*(put(i) for i in range(300)))
    items = await _all_pages(client, "/v1/admin/consumers", limit=1000)
    assert len(items) == 300
    plans = await _all_pages(client, "/v1/admin/plans", limit=1000)
    assert [p["id"] for p in plans] == ["p"]
    if isinstance(store, RedisStore):
        assert await store.prune("default") == 0
        assert len(await store.scan_key_index()) == 0
