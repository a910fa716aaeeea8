"""API key introspection (issue 18, acceptance 7's second half): a live key answers its
consumer's context, an unknown, revoked or orphaned key ``{"active": false}``, and no
introspection counts, charges or records anything; for gateway and admin tokens only,
rate limited per caller. In process over every store."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from sidecar.http.app import create_app
from sidecar.store.base import Store
from tests.conftest import ADMIN, make_settings, seed
from tests.test_access import bearer, mint

PATHS = ["/internal/api-keys/introspect", "/v1/api-keys/introspect"]


async def _key(http: httpx.AsyncClient, consumer_id: str) -> str:
    created = await http.post(f"/v1/admin/consumers/{consumer_id}/keys", json={}, headers=ADMIN)
    assert created.status_code == 201, created.text
    return created.json()["api_key"]


async def _state(http: httpx.AsyncClient, store: Store, consumer_id: str) -> tuple:
    view = (await http.get(f"/v1/admin/consumers/{consumer_id}", headers=ADMIN)).json()
    return view["windows"], view["balance"], view["pending"], len(await store.usage("default", consumer_id))


@pytest.mark.parametrize("path", PATHS)
async def test_a_live_key_answers_its_context_and_nothing_is_counted(
    client: httpx.AsyncClient, store: Store, path: str
) -> None:
    await seed(client, windows={"day": 5}, price=10, consumer_id="c1", balance=100)
    raw = await _key(client, "c1")
    gateway = bearer(await mint(client, "gateway"))
    before = await _state(client, store, "c1")
    answers = await asyncio.gather(
        *(client.post(path, json={"apiKey": raw}, headers=gateway) for _ in range(20))
    )
    assert {a.status_code for a in answers} == {200}
    body = answers[0].json()
    assert body["active"] is True
    assert (body["tenant"], body["consumer_id"], body["status"], body["plan_id"]) == (
        "default",
        "c1",
        "active",
        "plan",
    )
    assert body["wallet_mode"] == "prepaid" and len(body["key_hash"]) == 64 and body["key_created_at"]
    assert raw not in answers[0].text
    assert await _state(client, store, "c1") == before  # no window, wallet or usage record moved

    # The context follows the consumer: a suspension shows, the key stays live.
    assert (await client.post("/v1/admin/consumers/c1/suspend", json={}, headers=ADMIN)).status_code == 200
    assert (await client.post(path, json={"apiKey": raw}, headers=ADMIN)).json()["status"] == "suspended"


async def test_unknown_revoked_and_orphaned_keys_are_inactive(client: httpx.AsyncClient) -> None:
    await seed(client, consumer_id="c1")
    await seed(client, consumer_id="c2")
    gateway = bearer(await mint(client, "gateway"))
    unknown = await client.post(PATHS[0], json={"apiKey": "ak_never-issued-key"}, headers=gateway)
    assert (unknown.status_code, unknown.json()) == (200, {"active": False})
    revoked = await _key(client, "c1")
    key_hash = (await client.post(PATHS[0], json={"apiKey": revoked}, headers=gateway)).json()["key_hash"]
    gone = await client.delete(f"/v1/admin/consumers/c1/keys/{key_hash}", headers=ADMIN)
    assert gone.status_code == 200
    assert (await client.post(PATHS[0], json={"apiKey": revoked}, headers=gateway)).json() == {
        "active": False
    }
    orphan = await _key(client, "c2")
    assert (await client.delete("/v1/admin/consumers/c2", headers=ADMIN)).status_code == 200
    assert (await client.post(PATHS[1], json={"apiKey": orphan}, headers=gateway)).json() == {"active": False}


async def test_only_gateway_and_admin_tokens_of_the_tenant_may_introspect(client: httpx.AsyncClient) -> None:
    await seed(client, consumer_id="c1")
    raw = await _key(client, "c1")
    ask = {"apiKey": raw}
    assert (await client.post(PATHS[0], json=ask)).status_code == 401
    viewer = bearer(await mint(client, "viewer"))
    assert (await client.post(PATHS[0], json=ask, headers=viewer)).status_code == 403
    other = bearer(await mint(client, "gateway", tenant="other"))
    refused = await client.post(PATHS[0], json=ask, headers=other)
    assert (refused.status_code, refused.json()["error"]["code"]) == (404, "tenant_not_found")
    admin = bearer(await mint(client, "admin"))
    assert (await client.post(PATHS[0], json=ask, headers=admin)).json()["active"] is True


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({}, 400, "invalid_field"),
        ({"apiKey": "short"}, 400, "invalid_key"),
        ({"apiKey": "ak_long-enough-key", "extra": 1}, 400, "invalid_field"),
        ({"apiKey": "ak_long-enough-key", "tenant": "{bad}"}, 400, "invalid_identifier"),
    ],
)
async def test_bad_introspection_requests_are_refused(
    client: httpx.AsyncClient, body: dict, status: int, code: str
) -> None:
    response = await client.post(PATHS[0], json=body, headers=ADMIN)
    assert (response.status_code, response.json()["error"]["code"]) == (status, code)


async def test_introspection_is_rate_limited_per_caller(backend_url: str | None, prefix: str) -> None:
    where = {} if backend_url is None else {"redis_url": backend_url, "key_prefix": prefix}
    app = create_app(make_settings(introspect_per_second=5, **where))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sidecar") as http:
        one = bearer(await mint(http, "gateway", name="one"))
        two = bearer(await mint(http, "gateway", name="two"))
        ask = {"apiKey": "ak_never-issued-key"}
        answers = [await http.post(PATHS[0], json=ask, headers=one) for _ in range(12)]
        statuses = [a.status_code for a in answers]
        # 12 calls fall in at most two seconds, one of which holds 6 or more: at least one
        # is refused, and at most 5 a second get through.
        assert set(statuses) == {200, 429} and statuses.count(200) <= 10
        limited = next(a for a in answers if a.status_code == 429)
        assert limited.json()["error"]["code"] == "rate_limited" and limited.headers["retry-after"] == "1"
        # Another caller has its own allowance.
        assert (await http.post(PATHS[0], json=ask, headers=two)).status_code == 200
