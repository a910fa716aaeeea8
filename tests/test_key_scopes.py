"""API keys with scopes and an expiry (issue 18, acceptance 7's first half): a key
scoped to ``weather-api`` is refused on ``premium-api`` with ``scope_denied`` and
nothing counted, under concurrency; an expired key is ``key_expired``; both are read by
the decision itself, so a key registered again with other scopes is seen at once. In
process over every store; with Postgres, scopes and expiry are kept in the truth and
reach Redis by the change feed and by a full sync."""

from __future__ import annotations

import asyncio
import hashlib

import httpx
import pytest

from sidecar.store.base import Store
from tests.conftest import ADMIN, seed, until
from tests.test_access import bearer, mint
from tests.test_postgres import reconcile_once, stack

INTROSPECT = "/internal/api-keys/introspect"


async def _key(http: httpx.AsyncClient, consumer_id: str = "c1", **body) -> dict:
    created = await http.post(f"/v1/admin/consumers/{consumer_id}/keys", json=body, headers=ADMIN)
    assert created.status_code == 201, created.text
    return created.json()


async def _decide(http: httpx.AsyncClient, raw: str, product: str, operation: str = "") -> httpx.Response:
    ask = {"api_key": raw, "product": product, "operation": operation}
    return await http.post("/v1/authorize", json=ask)


async def _counted(http: httpx.AsyncClient, store: Store, consumer_id: str = "c1") -> tuple:
    view = (await http.get(f"/v1/admin/consumers/{consumer_id}", headers=ADMIN)).json()
    return view["windows"]["day"], view["balance"], len(await store.usage("default", consumer_id))


async def test_a_scoped_key_is_refused_outside_its_scopes_and_nothing_is_counted(
    client: httpx.AsyncClient, store: Store
) -> None:
    await seed(client, windows={"day": 1_000}, price=10, balance=100_000)
    key = await _key(client, scopes=["weather-api", "maps:geocode", "urn:x:y"])
    assert key["scopes"] == ["maps:geocode", "urn:x:y", "weather-api"]
    raw = key["api_key"]
    asks = (
        [("weather-api", "")] * 30  # the product: every operation
        + [("weather-api", "GET /forecast")] * 10
        + [("maps", "geocode")] * 20  # product:operation, compared whole
        + [("urn:x", "y")] * 5  # a product holding ':' named with its operation
        + [("premium-api", "")] * 40
        + [("maps", "route")] * 20
        + [("maps", "")] * 10
        + [("maps", "geocode-batch")] * 5
        + [("urn:x:y", "")] * 5  # a scope is never split: 'urn:x:y' names this product too
    )
    answers = await asyncio.gather(*(_decide(client, raw, p, o) for p, o in asks))
    by_product: dict[tuple[str, str], set[tuple[int, str]]] = {}
    for (product, operation), answer in zip(asks, answers, strict=True):
        by_product.setdefault((product, operation), set()).add((answer.status_code, answer.json()["reason"]))
    allowed = {("weather-api", ""), ("weather-api", "GET /forecast"), ("maps", "geocode"), ("urn:x", "y")}
    allowed |= {("urn:x:y", "")}
    for ask, outcomes in by_product.items():
        expected = (200, "ok") if ask in allowed else (403, "scope_denied")
        assert outcomes == {expected}, ask
    ok = sum(1 for a in answers if a.json()["reason"] == "ok")
    assert ok == 30 + 10 + 20 + 5 + 5
    # Only the allowed calls moved a window, the wallet and the usage stream.
    assert await _counted(client, store) == (ok, 100_000 - 10 * ok, ok)


async def test_a_scope_never_widens_the_plan(client: httpx.AsyncClient) -> None:
    await seed(client, windows={"day": 10}, products=["weather-api"])
    raw = (await _key(client, scopes=["weather-api", "premium-api"]))["api_key"]
    assert (await _decide(client, raw, "weather-api")).json()["reason"] == "ok"
    assert (await _decide(client, raw, "premium-api")).json()["reason"] == "product_not_allowed"


async def test_an_expired_key_is_refused_and_inactive_and_nothing_is_counted(
    client: httpx.AsyncClient, store: Store
) -> None:
    await seed(client, windows={"day": 1_000}, price=10, balance=100_000)
    key = await _key(client, expires_in_seconds=1)
    raw = key["api_key"]
    assert key["expires_at"] is not None
    assert (await _decide(client, raw, "api")).json()["reason"] == "ok"
    gateway = bearer(await mint(client, "gateway"))
    live = (await client.post(INTROSPECT, json={"apiKey": raw}, headers=gateway)).json()
    assert live["active"] is True and live["key_expires_at"] == key["expires_at"]

    await asyncio.sleep(1.2)  # past the expiry (asking meanwhile would count allowed calls)
    before = await _counted(client, store)
    answers = await asyncio.gather(*(_decide(client, raw, "api") for _ in range(40)))
    assert {(a.status_code, a.json()["reason"]) for a in answers} == {(401, "key_expired")}
    assert await _counted(client, store) == before == (1, 100_000 - 10, 1)
    gone = await client.post(INTROSPECT, json={"apiKey": raw}, headers=gateway)
    assert (gone.status_code, gone.json()) == (200, {"active": False})
    # Listed with its expiry; a key of the same consumer without one is unaffected.
    listed = (await client.get("/v1/admin/consumers/c1/keys", headers=ADMIN)).json()["keys"]
    assert [k["expires_at"] for k in listed] == [key["expires_at"]]
    other = (await _key(client))["api_key"]
    assert (await _decide(client, other, "api")).json()["reason"] == "ok"


async def test_a_key_registered_again_takes_its_new_scopes_at_once(client: httpx.AsyncClient) -> None:
    await seed(client, windows={"day": 100})
    raw = "legacy-key-0123456789"
    first = await _key(client, api_key=raw, scopes=["weather-api"])
    assert first["imported"] is True and first["scopes"] == ["weather-api"]
    created = (await client.get("/v1/admin/consumers/c1/keys", headers=ADMIN)).json()["keys"][0]["created_at"]
    assert (await _decide(client, raw, "premium-api")).json()["reason"] == "scope_denied"
    again = await _key(client, api_key=raw, scopes=[])
    assert again["scopes"] == []
    assert (await _decide(client, raw, "premium-api")).json()["reason"] == "ok"
    (listed,) = (await client.get("/v1/admin/consumers/c1/keys", headers=ADMIN)).json()["keys"]
    assert (listed["scopes"], listed["created_at"]) == ([], created)
    gateway = bearer(await mint(client, "gateway"))
    await _key(client, api_key=raw, scopes=["maps:geocode"])
    shown = (await client.post(INTROSPECT, json={"apiKey": raw}, headers=gateway)).json()
    assert shown["scopes"] == ["maps:geocode"]
    assert (await _decide(client, raw, "maps", "geocode")).json()["reason"] == "ok"
    assert (await _decide(client, raw, "premium-api")).json()["reason"] == "scope_denied"


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        ({"scopes": ["a|b"]}, "invalid_scope", "scopes"),
        ({"scopes": [""]}, "invalid_scope", "scopes"),
        ({"scopes": ["has space"]}, "invalid_scope", "scopes"),
        ({"scopes": ["{tag}:op"]}, "invalid_scope", "scopes"),
        ({"scopes": ["p:op\n"]}, "invalid_scope", "scopes"),
        ({"scopes": ["p" * 201]}, "invalid_scope", "scopes"),
        ({"scopes": ["p:" + "o" * 800]}, "invalid_scope", "scopes"),
        ({"scopes": [f"p{i}" for i in range(101)]}, "invalid_request", "scopes"),
        ({"scopes": "weather-api"}, "invalid_field", "scopes"),
        ({"expires_in_seconds": 0}, "invalid_request", "expires_in_seconds"),
        ({"expires_in_seconds": 11 * 365 * 86_400}, "invalid_request", "expires_in_seconds"),
        ({"expires_in_seconds": "1"}, "invalid_field", "expires_in_seconds"),
    ],
)
async def test_bad_scopes_and_expiries_are_refused_and_change_nothing(
    client: httpx.AsyncClient, body: dict, code: str, field: str
) -> None:
    await seed(client)
    refused = await client.post("/v1/admin/consumers/c1/keys", json=body, headers=ADMIN)
    assert refused.status_code == 400, refused.text
    assert (refused.json()["error"]["code"], refused.json()["error"].get("field")) == (code, field)
    assert len(refused.text) < 600  # an offending value is echoed as a short prefix at most
    assert (await client.get("/v1/admin/consumers/c1/keys", headers=ADMIN)).json()["keys"] == []


# --- with Postgres as the truth -----------------------------------------------------


@pytest.mark.slow
async def test_scopes_and_expiry_live_in_postgres_and_reach_redis_by_every_path(
    migrated_database, deployment_url, prefix, reconciler
):
    async with stack(migrated_database, deployment_url, prefix) as s:
        reconciler(migrated_database, deployment_url, prefix)
        await seed(s.http, windows={"day": 100})
        key = await _key(s.http, scopes=["weather-api"], expires_in_seconds=3600)
        raw = key["api_key"]
        row = await s.db.fetchrow(
            "SELECT scopes, expires_at FROM api_keys WHERE key_hash = $1", key["key_hash"]
        )
        assert row["scopes"] == ["weather-api"] and row["expires_at"].isoformat() == key["expires_at"]
        assert (await _decide(s.http, raw, "premium-api")).json()["reason"] == "scope_denied"

        # A change made in SQL reaches the very decisions through the change feed.
        await s.db.execute(
            "UPDATE api_keys SET scopes = '{premium-api}' WHERE key_hash = $1", key["key_hash"]
        )

        async def widened() -> bool:
            return (await _decide(s.http, raw, "premium-api")).json()["reason"] == "ok"

        await until(widened, 5, "the SQL scope change in Redis")
        assert (await _decide(s.http, raw, "weather-api")).json()["reason"] == "scope_denied"
        await s.db.execute(
            "UPDATE api_keys SET expires_at = now() - interval '1 second' WHERE key_hash = $1",
            key["key_hash"],
        )

        async def expired() -> bool:
            return (await _decide(s.http, raw, "premium-api")).json()["reason"] == "key_expired"

        await until(expired, 5, "the SQL expiry in Redis")

        # Redis loses the key's entry: a full sync puts it back whole, scopes and expiry.
        await s.store.revoke_key("default", "c1", key["key_hash"])
        assert (await _decide(s.http, raw, "premium-api")).json()["reason"] == "invalid_key"
        result = await asyncio.to_thread(reconcile_once, migrated_database, deployment_url, prefix)
        assert result.returncode == 0, result.stderr
        (restored,) = await s.store.consumer_keys("default", "c1")
        assert restored.key_hash == hashlib.sha256(raw.encode()).hexdigest()
        assert restored.scopes == ("premium-api",) and restored.expires_ms is not None
        assert (await _decide(s.http, raw, "premium-api")).json()["reason"] == "key_expired"
