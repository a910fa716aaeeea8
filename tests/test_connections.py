"""Gateway connections and the Kong catalog import, end to end: a sidecar backed by real
Postgres and Redis, a stub of Kong's Admin API as a real process (tests/stubs/), secrets
sealed at rest, preview and apply, revocation of what left the gateway, and a walk that
fails part way applying nothing."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import datetime, timedelta

import httpx
import pytest

from sidecar.core.api_keys import hash_api_key
from sidecar.core.models import UsageEvent
from sidecar.http import connections as connections_api
from sidecar.integrations import sync_loop
from sidecar.integrations.connection_store import ConnectionStore
from sidecar.integrations.kong.admin_client import KongAdminClient
from sidecar.integrations.secret_box import SecretBox, new_key
from sidecar.store.redis_store import RedisStore
from tests.conftest import ADMIN, seed, until
from tests.kong.emulator import KongRequest
from tests.kong.harness import Sidecar, fresh_minute, plugin_server, sidecar_config
from tests.stubs import StubServer
from tests.test_kong_import import kong_catalog
from tests.test_postgres import stack

pytestmark = pytest.mark.slow
KEYS = {"k1": new_key()}
TOKEN = "kong-admin-token-0123456789"


@pytest.fixture
def kong() -> Iterator[StubServer]:
    server = StubServer("kong_admin")
    server.faults(token=TOKEN)
    yield server
    server.stop()


async def _put(http: httpx.AsyncClient, kong: StubServer, **fields) -> httpx.Response:
    body = {"type": "kong", "base_url": kong.url, "token": TOKEN, **fields}
    return await http.put("/v1/admin/connections/kong-prod", json=body, headers=ADMIN)


async def _preview(http: httpx.AsyncClient) -> dict:
    response = await http.post("/v1/admin/connections/kong-prod/preview", headers=ADMIN)
    assert response.status_code == 200, response.text
    return response.json()


async def _apply(http: httpx.AsyncClient, token: str) -> httpx.Response:
    return await http.post("/v1/admin/connections/kong-prod/apply", json={"token": token}, headers=ADMIN)


async def test_a_connection_never_shows_stores_or_logs_its_secret_in_plain_text(
    migrated_database, redis_url, prefix, kong, caplog
):
    caplog.set_level(logging.DEBUG)
    async with stack(migrated_database, redis_url, prefix, secret_keys=KEYS) as s:
        created = await _put(s.http, kong, workspace=None)
        assert created.status_code == 201, created.text
        view = created.json()
        assert (view["token"], view["secret_key_id"], view["sync_interval_seconds"]) == (
            "<redacted>",
            "k1",
            60,
        )
        fetched = await s.http.get("/v1/admin/connections/kong-prod", headers=ADMIN)
        listed = await s.http.get("/v1/admin/connections", headers=ADMIN)
        assert fetched.json() == view and listed.json()["items"] == [view]
        stored = await s.db.fetch("SELECT row_to_json(t)::text AS row FROM connections t")
        sealed = await s.db.fetch("SELECT row_to_json(t)::text AS row FROM connection_secrets t")
        audit = await s.db.fetch("SELECT row_to_json(t)::text AS row FROM audit_log t")
        everything = [r["row"] for r in stored + sealed + audit] + [fetched.text, listed.text, caplog.text]
        assert not any(TOKEN in text for text in everything)
        assert sealed[0]["row"].count("v1.k1.") == 1
        # A write without the secret keeps it (the connection still reads Kong).
        assert (await _put(s.http, kong, token=None, sync_interval_seconds=120)).status_code == 200
        test = await s.http.post("/v1/admin/connections/kong-prod/test", headers=ADMIN)
        assert test.json()["ok"] is True
        # An empty secret removes it: Kong now refuses the connection.
        removed = await _put(s.http, kong, token="")
        assert removed.json()["token"] is None
        test = await s.http.post("/v1/admin/connections/kong-prod/test", headers=ADMIN)
        assert (test.json()["ok"], test.json()["error"]) == (False, "unauthorized")
        deleted = await s.http.delete("/v1/admin/connections/kong-prod", headers=ADMIN)
        assert deleted.json()["deleted"] is True
        assert await s.db.fetchval("SELECT count(*) FROM connection_secrets") == 0
        gone = await s.http.get("/v1/admin/connections/kong-prod", headers=ADMIN)
        assert (gone.status_code, gone.json()["error"]["code"]) == (404, "connection_not_found")


async def test_a_secret_without_secret_keys_is_refused_and_nothing_is_stored(
    migrated_database, redis_url, prefix, kong
):
    async with stack(migrated_database, redis_url, prefix) as s:
        response = await _put(s.http, kong)
        assert (response.status_code, response.json()["error"]["code"]) == (501, "secret_keys_required")
        assert await s.db.fetchval("SELECT count(*) FROM connections") == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"type": "kong", "base_url": "ftp://kong"}, "base_url"),
        ({"type": "gloo", "base_url": "http://kong"}, "type"),
        ({"type": "konnect", "base_url": "https://us.api.konghq.com"}, "control_plane_id"),
        ({"type": "apigee", "base_url": "https://apigee.googleapis.com"}, "organization"),
        ({"type": "kong", "base_url": "http://kong", "mapping": {"consumer_field": "email"}}, "mapping"),
        ({"type": "kong", "base_url": "http://kong", "sync_interval_seconds": 1}, "sync_interval_seconds"),
        (
            {"type": "apigee", "base_url": "https://a", "organization": "o", "mapping": {"page_size": 1}},
            "mapping",
        ),
        (
            {"type": "apigee", "base_url": "https://a", "organization": "o", "mapping": {"groups": {}}},
            "mapping",
        ),
        ({"type": "kong", "base_url": "http://kong", "password_hint": "x"}, None),
        # Found by schemathesis: each was a 500 at the write or at the first gateway call.
        ({"type": "kong", "base_url": "http://[::1"}, "base_url"),
        ({"type": "kong", "base_url": "http://kong:abc"}, "base_url"),
        ({"type": "kong", "base_url": "http://kong\n/x"}, "base_url"),
        ({"type": "kong", "base_url": "http://kong", "token": "t\u00f6ken"}, "token"),
        ({"type": "kong", "base_url": "http://kong", "username": "u", "password": "p\u0007"}, "password"),
        ({"type": "kong", "base_url": "http://kong", "workspace": "w\u0000"}, None),
    ],
)
async def test_a_bad_connection_is_a_400_naming_its_field(migrated_database, redis_url, prefix, body, field):
    async with stack(migrated_database, redis_url, prefix, secret_keys=KEYS) as s:
        response = await s.http.put("/v1/admin/connections/c1", json=body, headers=ADMIN)
        assert response.status_code == 400, response.text
        assert response.json()["error"].get("field") == field or field is None
        assert await s.db.fetchval("SELECT count(*) FROM connections") == 0


async def test_connection_test_counts_kong_or_names_the_failure(migrated_database, redis_url, prefix, kong):
    kong.state(**kong_catalog())
    async with stack(migrated_database, redis_url, prefix, secret_keys=KEYS) as s:
        await _put(s.http, kong)
        ok = await s.http.post("/v1/admin/connections/kong-prod/test", headers=ADMIN)
        assert ok.json() == {"ok": True, "counts": {"consumers": 250, "consumer_groups": 3, "services": 1}}
        await _put(s.http, kong, token="not-the-token")
        refused = await s.http.post("/v1/admin/connections/kong-prod/test", headers=ADMIN)
        assert (refused.json()["ok"], refused.json()["error"]) == (False, "unauthorized")
        await _put(s.http, kong, base_url="http://127.0.0.1:9")
        down = await s.http.post("/v1/admin/connections/kong-prod/test", headers=ADMIN)
        assert (down.json()["ok"], down.json()["error"]) == (False, "unreachable")


async def test_kong_is_imported_as_previewed_then_a_second_apply_changes_nothing(
    migrated_database, redis_url, prefix, kong
):
    kong.state(**kong_catalog())
    async with stack(migrated_database, redis_url, prefix, secret_keys=KEYS) as s:
        await _put(s.http, kong)
        preview = await _preview(s.http)
        assert preview["counts"] == {"plan.add": 3, "consumer.add": 250, "key.add": 250}
        applied = await _apply(s.http, preview["token"])
        assert applied.status_code == 200, applied.text
        assert applied.json()["counts"] == preview["counts"]
        assert await s.db.fetchval("SELECT count(*) FROM consumers") == 250
        actors = {r["actor"] for r in await s.db.fetch("SELECT DISTINCT actor FROM audit_log")}
        assert "connection:kong-prod" in actors

        # c-0000 is in gold: rate-limiting-advanced 100 per 60 s, so its 101st call is a 429.
        for consumer_id in ("c-0000", "c-0001"):  # prepaid, priced by the group's tag
            topup = {"amount": 1_000_000}
            await s.http.post(f"/v1/admin/consumers/{consumer_id}/topup", json=topup, headers=ADMIN)
        fresh_minute()
        reasons = [(await s.decide("c-0000"))["reason"] for _ in range(101)]
        assert reasons.count("ok") == 100 and reasons[-1] == "quota_exceeded"
        # Its Kong key works as it is: no rotation.
        by_key = await s.http.post("/v1/authorize", json={"api_key": "key-0001-secret", "product": "api"})
        assert (by_key.json()["allow"], by_key.json()["consumer_id"]) == (True, "c-0001")

        again = await _preview(s.http)
        assert again["counts"] == {} and again["changes"] == []
        assert (await _apply(s.http, again["token"])).json()["counts"] == {}
        view = (await s.http.get("/v1/admin/connections/kong-prod", headers=ADMIN)).json()
        assert view["last_sync"]["ok"] is True


async def test_what_leaves_kong_is_revoked_and_its_billing_history_stays(
    migrated_database, redis_url, prefix, kong
):
    catalog = kong_catalog(6)
    kong.state(**catalog)
    async with stack(migrated_database, redis_url, prefix, secret_keys=KEYS) as s:
        await seed(s.http, plan_id="by-hand", consumer_id="hand-made")  # never Kong's
        await _put(s.http, kong)
        assert (await _apply(s.http, (await _preview(s.http))["token"])).status_code == 200
        await s.http.post("/v1/admin/consumers/c-0003/topup", json={"amount": 5_000_000}, headers=ADMIN)
        assert (await s.decide("c-0003"))["allow"]

        catalog["consumers"] = [c for c in catalog["consumers"] if c["id"] != "c-0003"]
        catalog["key_auths"] = [k for k in catalog["key_auths"] if k["consumer"]["id"] != "c-0003"]
        catalog["key_auths"].append({"id": "k-new", "key": "key-0002-rotated", "consumer": {"id": "c-0002"}})
        kong.state(**catalog)
        preview = await _preview(s.http)
        assert preview["counts"] == {"consumer.revoke": 1, "key.add": 1}
        assert (await _apply(s.http, preview["token"])).status_code == 200
        assert (await s.decide("c-0003"))["reason"] == "revoked"
        assert (await s.decide("hand-made"))["allow"]
        wallet = await s.db.fetchval("SELECT balance FROM wallets WHERE consumer_id = 'c-0003'")
        assert wallet == 5_000_000
        assert await s.db.fetchval("SELECT count(*) FROM consumers WHERE id = 'c-0003'") == 1
        rotated = await s.http.post("/v1/authorize", json={"api_key": "key-0002-rotated", "product": "api"})
        assert rotated.json()["consumer_id"] == "c-0002"


async def test_a_walk_that_fails_part_way_applies_nothing_and_shows_in_last_sync(
    migrated_database, redis_url, prefix, kong
):
    kong.state(**kong_catalog(1200))  # two pages of consumers at Kong's 1000
    async with stack(migrated_database, redis_url, prefix, secret_keys=KEYS) as s:
        await _put(s.http, kong)
        preview = await _preview(s.http)
        kong.faults(token=TOKEN, faults=[{"path": "/consumers", "page": 2, "status": 500, "times": 1000}])
        failed = await _apply(s.http, preview["token"])
        assert (failed.status_code, failed.json()["error"]["code"]) == (502, "gateway_gateway_error")
        assert await s.db.fetchval("SELECT count(*) FROM consumers") == 0
        assert await s.db.fetchval("SELECT count(*) FROM plans") == 0
        view = (await s.http.get("/v1/admin/connections/kong-prod", headers=ADMIN)).json()
        assert (view["last_sync"]["ok"], view["last_sync"]["error"]) == (False, "gateway_error")


async def test_an_apply_after_the_gateway_moved_is_a_409_and_changes_nothing(
    migrated_database, redis_url, prefix, kong
):
    catalog = kong_catalog(3)
    kong.state(**catalog)
    async with stack(migrated_database, redis_url, prefix, secret_keys=KEYS) as s:
        await _put(s.http, kong)
        preview = await _preview(s.http)
        catalog["plugins"][1]["config"]["minute"] = 75
        kong.state(**catalog)
        stale = await _apply(s.http, preview["token"])
        assert (stale.status_code, stale.json()["error"]["code"]) == (409, "catalog_changed")
        assert await s.db.fetchval("SELECT count(*) FROM plans") == 0


async def test_connections_need_postgres(client):
    response = await client.get("/v1/admin/connections", headers=ADMIN)
    assert (response.status_code, response.json()["error"]["code"]) == (501, "postgres_required")


# --- registering an existing key ---------------------------------------------------------


async def test_an_existing_key_is_registered_by_hash_or_raw_and_never_moved(client):
    await seed(client, plan_id="p", consumer_id="a")
    await seed(client, plan_id="p", consumer_id="b")
    raw = "legacy-key-0123456789"
    by_raw = await client.post("/v1/admin/consumers/a/keys", json={"api_key": raw}, headers=ADMIN)
    assert by_raw.status_code == 201, by_raw.text
    assert by_raw.json() == {
        "key_hash": hash_api_key(raw),
        "consumer_id": "a",
        "tenant": "default",
        "scopes": [],
        "expires_at": None,
        "imported": True,
    }
    assert raw not in by_raw.text
    decision = await client.post("/v1/authorize", json={"api_key": raw, "product": "api"})
    assert (decision.json()["allow"], decision.json()["consumer_id"]) == (True, "a")
    other = hash_api_key("another-legacy-key")
    by_hash = await client.post("/v1/admin/consumers/b/keys", json={"key_hash": other.upper()}, headers=ADMIN)
    assert by_hash.json()["key_hash"] == other
    again = await client.post("/v1/admin/consumers/a/keys", json={"api_key": raw}, headers=ADMIN)
    assert again.status_code == 201  # its own key again: kept
    taken = await client.post("/v1/admin/consumers/b/keys", json={"api_key": raw}, headers=ADMIN)
    assert (taken.status_code, taken.json()["error"]["code"]) == (409, "key_in_use")
    still = await client.post("/v1/authorize", json={"api_key": raw, "product": "api"})
    assert still.json()["consumer_id"] == "a"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"key_hash": "abc"}, "key_hash"),
        ({"key_hash": "g" * 64}, "key_hash"),
        ({"api_key": "short"}, "api_key"),
        ({"api_key": "long-enough-key", "key_hash": "a" * 64}, "api_key"),
    ],
)
async def test_a_bad_key_to_register_is_a_400(client, body, field):
    await seed(client, plan_id="p", consumer_id="a")
    response = await client.post("/v1/admin/consumers/a/keys", json=body, headers=ADMIN)
    assert (response.status_code, response.json()["error"]["field"]) == (400, field)
    keys = await client.get("/v1/admin/consumers/a/keys", headers=ADMIN)
    assert keys.json()["keys"] == []


# --- periodic sync and native enforcement ---------------------------------------------


async def test_the_periodic_sync_applies_what_changed_in_kong_once_imported(
    migrated_database, redis_url, prefix, kong
):
    catalog = kong_catalog(6)
    kong.state(**catalog)
    async with stack(migrated_database, redis_url, prefix, secret_keys=KEYS) as s:
        await _put(s.http, kong, sync_interval_seconds=10)
        catalog_of = s.http._transport.app.state.catalog  # type: ignore[attr-defined]
        ledger = await catalog_of.ledger()
        store = ConnectionStore(ledger.pool, SecretBox(KEYS))
        assert await sync_loop.sync_due(store, ledger, catalog_of) == 0  # never applied: waits for a preview
        assert (await _apply(s.http, (await _preview(s.http))["token"])).status_code == 200
        assert await sync_loop.sync_due(store, ledger, catalog_of) == 0  # not due yet

        catalog["consumers"] = [c for c in catalog["consumers"] if c["id"] != "c-0005"]
        catalog["plugins"][1]["config"]["minute"] = 75  # silver
        kong.state(**catalog)
        await s.db.execute(
            "UPDATE connections SET last_sync = jsonb_set(last_sync, '{at}', to_jsonb($1::text))",
            "2026-01-01T00:00:00+00:00",
        )
        assert await sync_loop.sync_due(store, ledger, catalog_of) == 1
        assert (await s.decide("c-0005"))["reason"] == "revoked"
        plan = (await s.http.get("/v1/admin/plans/silver", headers=ADMIN)).json()
        assert plan["windows"] == {"minute": 75}

        # A failing walk applies nothing and is recorded; the next round tries again.
        kong.faults(token=TOKEN, faults=[{"path": "/consumers", "page": 1, "status": 503, "times": 1000}])
        await s.db.execute(
            "UPDATE connections SET last_sync = jsonb_set(last_sync, '{at}', to_jsonb($1::text))",
            "2026-01-01T00:00:00+00:00",
        )
        assert await sync_loop.sync_due(store, ledger, catalog_of) == 1
        view = (await s.http.get("/v1/admin/connections/kong-prod", headers=ADMIN)).json()
        assert (view["last_sync"]["ok"], view["last_sync"]["error"]) == (False, "gateway_error")


async def test_the_reconciler_runs_the_periodic_sync(migrated_database, redis_url, prefix, kong, reconciler):
    catalog = kong_catalog(3)
    kong.state(**catalog)
    async with stack(migrated_database, redis_url, prefix, secret_keys=KEYS) as s:
        await _put(s.http, kong, sync_interval_seconds=10)
        assert (await _apply(s.http, (await _preview(s.http))["token"])).status_code == 200
        catalog["consumers"] = catalog["consumers"][:2]
        kong.state(**catalog)
        reconciler(
            migrated_database,
            redis_url,
            prefix,
            AFORO_SECRET_KEYS=",".join(f"{k}={v}" for k, v in KEYS.items()),
        )

        async def revoked() -> bool:
            return (await s.decide("c-0002"))["reason"] == "revoked"

        await until(revoked, 30, "the periodic sync to revoke what left Kong")


async def test_a_suspension_is_pushed_to_kong_as_an_acl_deny_group_when_the_connection_says_so(
    migrated_database, redis_url, prefix, kong, monkeypatch
):
    kong.state(**kong_catalog(3))
    async with stack(migrated_database, redis_url, prefix, secret_keys=KEYS) as s:
        await _put(s.http, kong)
        assert (await _apply(s.http, (await _preview(s.http))["token"])).status_code == 200
        calls = len(kong.calls())
        off = await s.http.post("/integrations/kong/suspend", json={"consumer_id": "c-0001"}, headers=ADMIN)
        assert off.json()["status"] == "suspended" and "pushed" not in off.json()
        assert len(kong.calls()) == calls  # push_status off: Kong is not told
        await s.http.post("/integrations/kong/resume", json={"consumer_id": "c-0001"}, headers=ADMIN)

        await _put(s.http, kong, mapping={"push_status": True, "deny_group": "blocked"})
        pushed = [{"connection_id": "kong-prod", "type": "kong", "result": "updated"}]
        first = await s.http.post("/integrations/kong/suspend", json={"consumer_id": "c-0001"}, headers=ADMIN)
        assert (first.json()["status"], first.json()["pushed"]) == ("suspended", pushed)
        assert [(a["group"], a["consumer"]["id"]) for a in kong.current()["acls"]] == [("blocked", "c-0001")]
        again = await s.http.post("/v1/admin/consumers/c-0001/suspend", json={}, headers=ADMIN)
        assert again.json()["pushed"][0]["result"] == "unchanged"
        assert len(kong.current()["acls"]) == 1
        resumed = await s.http.post(
            "/integrations/kong/resume", json={"consumer_id": "c-0001"}, headers=ADMIN
        )
        assert (resumed.json()["status"], resumed.json()["pushed"]) == ("active", pushed)
        assert kong.current()["acls"] == []
        writes = [(c["method"], c["path"]) for c in kong.calls()[calls:] if c["method"] != "GET"]
        acl = writes[1][1].rsplit("/", 1)[1]
        assert writes == [("POST", "/consumers/c-0001/acls"), ("DELETE", f"/consumers/c-0001/acls/{acl}")]
        audited = await s.db.fetchval("SELECT count(*) FROM audit_log WHERE action = 'kong.consumer_status'")
        assert audited == 2
        # Kong answering 503 with a long Retry-After: the push gives up within its budget,
        # the sidecar's status is changed all the same.
        monkeypatch.setattr(connections_api, "PUSH_BUDGET_S", 0.5)
        slow = [{"path": "/consumers/c-0002/acls", "status": 503, "retry_after": 2, "times": 100}]
        kong.faults(token=TOKEN, faults=slow)
        started = time.monotonic()
        stuck = await s.http.post("/v1/admin/consumers/c-0002/suspend", json={}, headers=ADMIN)
        assert time.monotonic() - started < 2
        assert (stuck.json()["status"], stuck.json()["pushed"][0]["error"]) == ("suspended", "timeout")
        # A hand-made consumer no connection imported is never pushed anywhere.
        await seed(s.http, plan_id="hand", consumer_id="hand-made")
        hand = await s.http.post("/v1/admin/consumers/hand-made/suspend", json={}, headers=ADMIN)
        assert "pushed" not in hand.json()


async def test_enforce_groups_pushes_a_plan_s_limits_once(migrated_database, redis_url, prefix, kong):
    kong.state(**kong_catalog(3))
    async with stack(migrated_database, redis_url, prefix, secret_keys=KEYS) as s:
        await _put(s.http, kong)
        await s.http.put("/v1/admin/plans/pro", json={"windows": {"minute": 30, "day": 1000}}, headers=ADMIN)
        body = {"connection_id": "kong-prod", "group": "silver", "plan_id": "pro"}
        first = await s.http.post("/integrations/kong/enforce/groups", json=body, headers=ADMIN)
        assert first.status_code == 200, first.text
        assert first.json() == {"group": "silver", "config": {"day": 1000, "minute": 30}, "result": "updated"}
        again = await s.http.post("/integrations/kong/enforce/groups", json=body, headers=ADMIN)
        assert again.json()["result"] == "unchanged"
        fresh = {"connection_id": "kong-prod", "group": "g-gold", "limits": {"hour": 500}}
        created = await s.http.post("/integrations/kong/enforce/groups", json=fresh, headers=ADMIN)
        assert created.json()["result"] == "created"  # gold had only rate-limiting-advanced
        writes = [(c["method"], c["path"], c["body"]) for c in kong.calls() if c["method"] != "GET"]
        assert writes == [
            (
                "PATCH",
                "/consumer_groups/g-silver/plugins/p-silver",
                {"config": {"minute": 30, "hour": None, "day": 1000, "month": None}},
            ),
            (
                "POST",
                "/consumer_groups/g-gold/plugins",
                {
                    "name": "rate-limiting",
                    "config": {"minute": None, "hour": 500, "day": None, "month": None},
                },
            ),
        ]
        pushes = await s.db.fetchval("SELECT count(*) FROM audit_log WHERE action = 'kong.enforce_group'")
        assert pushes == 2
        week = {"connection_id": "kong-prod", "group": "silver", "limits": {"week": 5}}
        refused = await s.http.post("/integrations/kong/enforce/groups", json=week, headers=ADMIN)
        assert (refused.status_code, refused.json()["error"]["code"]) == (400, "unknown_window")
        missing = {"connection_id": "kong-prod", "group": "platinum", "limits": {"day": 5}}
        absent = await s.http.post("/integrations/kong/enforce/groups", json=missing, headers=ADMIN)
        assert (absent.status_code, absent.json()["error"]["code"]) == (502, "gateway_not_found")


async def test_kong_health_shows_reachability_syncs_the_reconciler_and_the_backlog(
    migrated_database, redis_url, prefix, kong, reconciler
):
    kong.state(**kong_catalog(3))
    async with stack(migrated_database, redis_url, prefix, secret_keys=KEYS) as s:
        await _put(s.http, kong, sync_interval_seconds=60)
        before = (await s.http.get("/integrations/kong/health", headers=ADMIN)).json()
        assert before["reconciler_alive"] is False and before["reconciler_last_seen"] is None
        (connection,) = before["connections"]
        assert (connection["reachable"], connection["gateway"]) == (True, {"database_reachable": True})
        assert connection["last_sync"] is None and connection["next_sync_at"] is None

        assert (await _apply(s.http, (await _preview(s.http))["token"])).status_code == 200
        await s.http.post("/v1/usage", json={"consumer_id": "c-0000", "request_id": "r-1"})
        await s.store.flush_dirty()
        waiting = (await s.http.get("/integrations/kong/health", headers=ADMIN)).json()
        assert waiting["streams_waiting"] >= 1
        (connection,) = waiting["connections"]
        last = datetime.fromisoformat(connection["last_sync"]["at"])
        assert datetime.fromisoformat(connection["next_sync_at"]) == last + timedelta(seconds=60)

        reconciler(migrated_database, redis_url, prefix)

        async def alive() -> bool:
            health = (await s.http.get("/integrations/kong/health", headers=ADMIN)).json()
            return health["reconciler_alive"] and health["streams_waiting"] == 0

        await until(alive, 10, "the reconciler's heartbeat and an empty backlog")
        kong.faults(token="another-token")
        refused = (await s.http.get("/integrations/kong/health", headers=ADMIN)).json()
        assert (refused["connections"][0]["reachable"], refused["connections"][0]["error"]) == (
            False,
            "unauthorized",
        )


# --- Konnect (a control plane's core entities) and the seed's alias paths ------------------


async def test_konnect_is_imported_through_the_seed_paths(migrated_database, redis_url, prefix, kong):
    kong.state(**kong_catalog(120))
    kong.faults(token="kpat_konnect_token_0123", konnect="cp-1")
    async with stack(migrated_database, redis_url, prefix, secret_keys=KEYS) as s:
        body = {"base_url": kong.url, "token": "kpat_konnect_token_0123", "control_plane_id": "cp-1"}
        created = await s.http.post("/integrations/konnect/connection", json=body, headers=ADMIN)
        assert created.status_code == 201, created.text
        assert (created.json()["id"], created.json()["type"], created.json()["token"]) == (
            "konnect",
            "konnect",
            "<redacted>",
        )
        test = await s.http.get("/integrations/konnect/connection/test", headers=ADMIN)
        assert test.json() == {
            "ok": True,
            "counts": {"control_planes": 1, "consumers": 120, "consumer_groups": 3, "services": 1},
        }
        consumers = await s.http.get("/integrations/konnect/consumers", headers=ADMIN)
        assert len(consumers.json()["data"]) == 120
        groups = await s.http.get("/integrations/konnect/consumer-groups", headers=ADMIN)
        assert sorted(g["name"] for g in groups.json()["data"]) == ["bronze", "gold", "silver"]
        unknown = await s.http.get("/integrations/konnect/widgets", headers=ADMIN)
        assert unknown.status_code == 404
        preview = await s.http.post("/integrations/konnect/runtime/preview", headers=ADMIN)
        assert preview.json()["counts"] == {"plan.add": 3, "consumer.add": 120, "key.add": 120}
        applied = await s.http.post(
            "/integrations/konnect/runtime/apply", json={"token": preview.json()["token"]}, headers=ADMIN
        )
        assert applied.status_code == 200, applied.text
        assert await s.db.fetchval("SELECT count(*) FROM consumers") == 120
        paths = {c["raw"] for c in kong.calls()}
        assert "/v2/control-planes/cp-1/core-entities/consumers" in paths  # Konnect's own paths
        # Konnect pages by offset alone: the walk followed it to the end (120 on 1 page of 1000).
        health = (await s.http.get("/integrations/konnect/health", headers=ADMIN)).json()
        (connection,) = health["connections"]
        assert (connection["type"], connection["reachable"], connection["gateway"]) == (
            "konnect",
            True,
            {"control_plane": "default"},
        )
        assert connection["last_sync"]["counts"] == preview.json()["counts"]
        kong.faults(token="kpat_other", konnect="cp-1")
        refused = await s.http.get("/integrations/konnect/connection/test", headers=ADMIN)
        assert (refused.json()["ok"], refused.json()["error"]) == (False, "unauthorized")
        health = (await s.http.get("/integrations/konnect/health", headers=ADMIN)).json()
        assert (health["connections"][0]["reachable"], health["connections"][0]["error"]) == (
            False,
            "unauthorized",
        )


async def test_a_konnect_walk_follows_offsets_page_after_page(kong):
    kong.state(**kong_catalog(250))
    kong.faults(token="kpat_t", konnect="cp-9")
    client = KongAdminClient(kong.url, token="kpat_t", control_plane_id="cp-9", page_size=100)
    try:
        assert len(await client.walk("/consumers")) == 250
    finally:
        await client.aclose()
    offsets = [
        c["query"].get("offset") for c in kong.calls() if c["raw"].endswith("/core-entities/consumers")
    ]
    assert len(offsets) == 3 and offsets[0] is None and all(offsets[1:])


def test_an_imported_kong_group_is_enforced_through_the_real_plugin(
    migrated_database, redis_url, prefix, kong, tmp_path
):
    """Acceptance 1 end to end: Kong's catalog imported through a sidecar process, then
    the Kong emulator with the real aforo-authorize plugin enforces the group's limit."""
    kong.state(**kong_catalog(250))
    env = {
        "AFORO_REDIS_URL": redis_url,
        "AFORO_KEY_PREFIX": prefix,
        "AFORO_DATABASE_URL": migrated_database,
        "AFORO_SECRET_KEYS": ",".join(f"{k}={v}" for k, v in KEYS.items()),
    }
    sidecar = Sidecar(str(tmp_path), env).start()
    try:
        with httpx.Client(base_url=sidecar.url, headers=ADMIN, timeout=30) as http:
            body = {"type": "kong", "base_url": kong.url, "token": TOKEN}
            assert http.put("/v1/admin/connections/kong-prod", json=body).status_code == 201
            preview = http.post("/v1/admin/connections/kong-prod/preview").json()
            applied = http.post("/v1/admin/connections/kong-prod/apply", json={"token": preview["token"]})
            assert applied.json()["counts"] == {"plan.add": 3, "consumer.add": 250, "key.add": 250}
            http.post("/v1/admin/consumers/c-0000/topup", json={"amount": 1_000_000}).raise_for_status()
        with plugin_server() as server:
            instance = server.kong.start_instance(sidecar_config(sidecar, product="catalog"))
            fresh_minute()
            plays = [server.kong.play(instance, KongRequest(consumer={"id": "c-0000"})) for _ in range(101)]
            assert [p.status for p in plays].count(200) == 100
            assert (plays[-1].status, plays[-1].exit.body["reason"]) == (429, "quota_exceeded")
            assert plays[-1].header("X-RateLimit-Limit-Minute") == "100"
            assert server.stop() == 0
    finally:
        sidecar.stop()


async def test_a_secret_sealed_under_a_key_since_removed_is_a_503(migrated_database, redis_url, prefix, kong):
    async with stack(migrated_database, redis_url, prefix, secret_keys=KEYS) as s:
        assert (await _put(s.http, kong)).status_code == 201
    async with stack(migrated_database, redis_url, prefix, secret_keys={"k2": new_key()}) as s:
        response = await s.http.post("/v1/admin/connections/kong-prod/test", headers=ADMIN)
        assert (response.status_code, response.json()["error"]["code"]) == (503, "secret_unavailable")
        assert TOKEN not in response.text
    async with stack(migrated_database, redis_url, prefix) as s:  # no keys at all
        response = await s.http.post("/v1/admin/connections/kong-prod/preview", headers=ADMIN)
        assert (response.status_code, response.json()["error"]["code"]) == (501, "secret_keys_required")


async def test_the_reconciler_heartbeat_and_the_backlog_read_on_every_deployment(deployment_url, prefix):
    store = RedisStore(deployment_url, prefix=prefix)
    try:
        assert await store.health() == (None, 0)
        await store.beat()
        await store.record_events([UsageEvent(consumer_id="c1", request_id="r1")], 60_000)
        await store.flush_dirty()
        beat, waiting = await store.health()
        assert beat is not None and abs(beat - time.time() * 1000) < 60_000
        assert waiting == 1  # the event stream of c1
    finally:
        await store.close()
