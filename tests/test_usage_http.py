"""POST /v1/usage: gateway events over HTTP, deduplicated, invalid ones refused."""

from __future__ import annotations

import asyncio

from sidecar.store.base import Store


def _event(i: int, **overrides) -> dict:
    return {
        "consumer_id": "c1",
        "request_id": f"req-{i}",
        "product": "api",
        "method": "GET",
        "status": 200,
        "request_size": i,
        "headers": {"user-agent": "t"},
        **overrides,
    }


async def test_events_are_stored_once_even_when_resent_concurrently(client, store: Store):
    batch = [_event(i) for i in range(50)]
    answers = await asyncio.gather(*(client.post("/v1/usage", json=batch) for _ in range(4)))
    assert all(a.status_code == 200 for a in answers)
    assert sum(a.json()["accepted"] for a in answers) == 50
    assert sum(a.json()["duplicates"] for a in answers) == 150
    stored = await store.events("default", "c1")
    assert sorted(e.request_size for e in stored) == list(range(50))


async def test_a_single_event_object_is_accepted(client, store: Store):
    answer = await client.post("/v1/usage", json=_event(7, tenant="acme"))
    assert answer.json() == {"accepted": 1, "duplicates": 0, "rejected": 0, "errors": []}
    assert [e.request_id for e in await store.events("acme", "c1")] == ["req-7"]


async def test_invalid_events_are_counted_listed_and_not_stored(client, store: Store):
    batch = [_event(1), _event(2, consumer_id="a b"), _event(3, status="teapot"), _event(4, body="secret")]
    answer = (await client.post("/v1/usage", json=batch)).json()
    assert (answer["accepted"], answer["rejected"]) == (1, 3)
    assert [(e["code"], e["field"]) for e in answer["errors"]] == [
        ("invalid_identifier", "[1].consumer_id"),
        ("invalid_field", "[2].status"),
        ("invalid_field", "[3]"),
    ]
    assert [e.request_id for e in await store.events("default", "c1")] == ["req-1"]


async def test_bad_bodies_are_refused_whole(client, store: Store, settings):
    assert (await client.post("/v1/usage", content=b"[{")).json()["error"]["code"] == "malformed_json"
    too_many = [{"consumer_id": "c1", "request_id": f"r{i}"} for i in range(settings.max_batch_items + 1)]
    response = await client.post("/v1/usage", json=too_many)
    assert (response.status_code, response.json()["error"]["code"]) == (400, "batch_too_large")
    big = await client.post("/v1/usage", content=b"[" + b" " * settings.max_body_bytes + b"]")
    assert big.status_code == 413
    assert await store.events("default", "c1") == []
