"""Apigee connections end to end: a sidecar backed by real Postgres and Redis, a stub of
Apigee's Management API as a real process, the seed paths (connect, catalog sync), the
periodic sync, quota enforcement pushed to Apigee, and health (issue 16, acceptance 3
and the Apigee half of 6)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from sidecar.integrations import sync_loop
from sidecar.integrations.connection_store import ConnectionStore
from sidecar.integrations.secret_box import SecretBox, new_key
from tests.conftest import ADMIN
from tests.stubs import StubServer
from tests.test_apigee_import import TOKEN, apigee_catalog, app_key
from tests.test_postgres import stack

pytestmark = pytest.mark.slow
KEYS = {"k1": new_key()}


def _connection(apigee: StubServer, **fields) -> dict:
    return {
        "base_url": f"{apigee.url}/v1",
        "organization": "acme",
        "environments": ["prod"],
        "token": TOKEN,
        "mapping": {"page_size": 100, "wallet_mode": "postpaid"},
        **fields,
    }


async def _sync(http, **body) -> dict:
    response = await http.post("/integrations/apigee/catalog/sync", json=body, headers=ADMIN)
    assert response.status_code == 200, response.text
    return response.json()


def _app(apigee: StubServer, app_id: str) -> dict:
    return next(a for a in apigee.current()["apps"] if a["appId"] == app_id)


async def _make_due(db) -> None:
    await db.execute(
        "UPDATE connections SET last_sync = jsonb_set(last_sync, '{at}', to_jsonb($1::text))",
        "2026-01-01T00:00:00+00:00",
    )


async def test_apigee_products_apps_and_keys_are_imported_and_kept_in_step(
    migrated_database, redis_url, prefix, apigee
):
    catalog = apigee_catalog(apps=250)
    apigee.state(**catalog)
    async with stack(migrated_database, redis_url, prefix, secret_keys=KEYS) as s:
        created = await s.http.post("/integrations/apigee/connect", json=_connection(apigee), headers=ADMIN)
        assert created.status_code == 201, created.text
        assert (created.json()["id"], created.json()["token"], created.json()["sync_interval_seconds"]) == (
            "apigee",
            "<redacted>",
            300,
        )
        test = await s.http.post("/v1/admin/connections/apigee/test", headers=ADMIN)
        assert test.json() == {"ok": True, "counts": {"products": 3, "apps": 250, "developers": 25}}

        preview = await _sync(s.http)
        assert preview["counts"] == {"plan.add": 3, "consumer.add": 250, "key.add": 250}
        applied = await _sync(s.http, token=preview["token"])
        assert applied["counts"] == preview["counts"]
        assert (await _sync(s.http))["counts"] == {}  # idempotent: nothing left to do

        # gold: 50 a day at 0.002; 64 concurrent calls of a gold app: exactly 50 allowed.
        answers = await asyncio.gather(*(s.decide("app-0003") for _ in range(64)))
        assert [a["allow"] for a in answers].count(True) == 50
        assert {a["reason"] for a in answers if not a["allow"]} == {"quota_exceeded"}
        by_key = await s.http.post("/v1/authorize", json={"api_key": app_key(4), "product": "api"})
        assert (by_key.json()["allow"], by_key.json()["consumer_id"]) == (True, "app-0004")
        consumer = (await s.http.get("/v1/admin/consumers/app-0000", headers=ADMIN)).json()
        assert consumer["plan_id"] == "gold"  # granted gold and silver: the first by name

        # In Apigee: app-0007 revoked, app-0010 deleted, gold's quota changed, one new app,
        # app-0005's key rotated (a new credential, the old one revoked).
        catalog["apps"][7]["status"] = "revoked"
        old_credential = catalog["apps"][5]["credentials"][0]
        rotated = {**old_credential, "consumerKey": "ck-rotated-0123456789abcdef"}
        catalog["apps"][5]["credentials"] = [{**old_credential, "status": "revoked"}, rotated]
        del catalog["apps"][10]
        catalog["products"][0]["quota"] = "60"
        grant = [{"apiproduct": "bronze", "status": "approved"}]
        credential = {"consumerKey": "ck-new-0123456789abcdef", "status": "approved", "apiProducts": grant}
        catalog["apps"].append(
            {**catalog["apps"][0], "appId": "app-new", "name": "app-new", "credentials": [credential]}
        )
        apigee.state(**catalog)
        catalog_of = s.http._transport.app.state.catalog  # type: ignore[attr-defined]
        ledger = await catalog_of.ledger()
        store = ConnectionStore(ledger.pool, SecretBox(KEYS))
        assert await sync_loop.sync_due(store, ledger, catalog_of) == 0  # not due for 5 minutes
        await _make_due(s.db)
        assert await sync_loop.sync_due(store, ledger, catalog_of) == 1
        assert (await s.decide("app-0007"))["reason"] == "revoked"
        assert (await s.decide("app-0010"))["reason"] == "revoked"
        revoked_key = await s.http.post("/v1/authorize", json={"api_key": app_key(7), "product": "api"})
        assert revoked_key.json()["allow"] is False
        plan = (await s.http.get("/v1/admin/plans/gold", headers=ADMIN)).json()
        assert plan["windows"] == {"day": 60}
        for key, allowed in ((app_key(5), False), ("ck-rotated-0123456789abcdef", True)):
            answer = await s.http.post("/v1/authorize", json={"api_key": key, "product": "api"})
            assert answer.json()["allow"] is allowed, key
        assert (await s.decide("app-0003"))["allow"] is True  # 51st of 60
        # Nothing deleted: the revoked apps' wallets and rows stay in Postgres.
        rows = await s.db.fetch(
            "SELECT c.id, c.status FROM consumers c"
            " JOIN wallets w ON (w.tenant, w.consumer_id) = (c.tenant, c.id)"
            " WHERE c.id IN ('app-0007', 'app-0010') ORDER BY c.id"
        )
        assert [(r["id"], r["status"]) for r in rows] == [("app-0007", "revoked"), ("app-0010", "revoked")]
        new = await s.http.post(
            "/v1/authorize", json={"api_key": "ck-new-0123456789abcdef", "product": "api"}
        )
        assert (new.json()["allow"], new.json()["consumer_id"]) == (True, "app-new")
        assert (await s.http.get("/v1/admin/consumers/app-new", headers=ADMIN)).json()["plan_id"] == "bronze"

        # A suspension made here is not ended by Apigee saying "approved".
        suspended = await s.http.post("/v1/admin/consumers/app-0003/suspend", json={}, headers=ADMIN)
        assert suspended.status_code == 200
        await _make_due(s.db)
        assert await sync_loop.sync_due(store, ledger, catalog_of) == 1
        assert (await s.decide("app-0003"))["reason"] == "suspended"
        # Re-approved in Apigee: active again.
        catalog["apps"][7]["status"] = "approved"
        apigee.state(**catalog)
        await _make_due(s.db)
        assert await sync_loop.sync_due(store, ledger, catalog_of) == 1
        assert (await s.decide("app-0007"))["allow"] is True

        # A product removed from Apigee: its apps lose their only grant and are revoked;
        # the plan stays (plans are never deleted by an import).
        catalog["products"] = [p for p in catalog["products"] if p["name"] != "bronze"]
        apigee.state(**catalog)
        await _make_due(s.db)
        assert await sync_loop.sync_due(store, ledger, catalog_of) == 1
        assert (await s.decide("app-0002"))["reason"] == "revoked"
        assert (await s.decide("app-0001"))["allow"] is True  # silver
        assert (await s.http.get("/v1/admin/plans/bronze", headers=ADMIN)).status_code == 200

        health = (await s.http.get("/integrations/apigee/health", headers=ADMIN)).json()
        (connection,) = health["connections"]
        assert (connection["id"], connection["type"], connection["reachable"]) == ("apigee", "apigee", True)
        assert connection["gateway"] == {"runtimeType": "CLOUD"}
        assert connection["last_sync"]["ok"] is True and connection["next_sync_at"] is not None


async def test_a_failing_walk_applies_nothing_and_shows_in_health_and_a_401_in_test(
    migrated_database, redis_url, prefix, apigee
):
    catalog = apigee_catalog(apps=250)
    apigee.state(**catalog)
    async with stack(migrated_database, redis_url, prefix, secret_keys=KEYS) as s:
        await s.http.post("/integrations/apigee/connect", json=_connection(apigee), headers=ADMIN)
        preview = await _sync(s.http)
        await _sync(s.http, token=preview["token"])
        # Page 3 of the apps keeps failing: the 200 apps read would revoke 50 if applied.
        apigee.faults(token=TOKEN, faults=[{"path": "/apps", "page": 3, "status": 500, "times": 1000}])
        failed = await s.http.post(
            "/integrations/apigee/catalog/sync", json={"token": preview["token"]}, headers=ADMIN
        )
        assert (failed.status_code, failed.json()["error"]["code"]) == (502, "gateway_gateway_error")
        assert await s.db.fetchval("SELECT count(*) FROM consumers WHERE status = 'revoked'") == 0
        assert (await s.decide("app-0249"))["allow"] is True
        health = (await s.http.get("/integrations/apigee/health", headers=ADMIN)).json()
        (connection,) = health["connections"]
        assert (connection["last_sync"]["ok"], connection["last_sync"]["error"]) == (False, "gateway_error")
        assert connection["reachable"] is True  # the organization answers; its app list does not

        apigee.faults(token="ya29.rotated-elsewhere")
        test = await s.http.post("/v1/admin/connections/apigee/test", headers=ADMIN)
        assert (test.json()["ok"], test.json()["error"]) == (False, "unauthorized")
        health = (await s.http.get("/integrations/apigee/health", headers=ADMIN)).json()
        assert (health["connections"][0]["reachable"], health["connections"][0]["error"]) == (
            False,
            "unauthorized",
        )
        assert TOKEN not in test.text and TOKEN not in str(health)


async def test_edge_connections_use_basic_credentials_that_are_never_shown(
    migrated_database, redis_url, prefix, apigee, caplog
):
    caplog.set_level(logging.DEBUG)
    apigee.state(**apigee_catalog(apps=120))
    apigee.faults(token=None, api="edge", basic=["ops@acme.example", "edge-password-1"])
    body = _connection(apigee, token=None, username="ops@acme.example", password="edge-password-1")
    body["mapping"] = {"api": "edge", "page_size": 50}
    async with stack(migrated_database, redis_url, prefix, secret_keys=KEYS) as s:
        created = await s.http.put(
            "/v1/admin/connections/edge", json={"type": "apigee", **body}, headers=ADMIN
        )
        assert created.json()["password"] == "<redacted>"
        test = await s.http.post("/v1/admin/connections/edge/test", headers=ADMIN)
        assert test.json() == {"ok": True, "counts": {"products": 3, "apps": 120, "developers": 25}}
        preview = await _sync(s.http, connection_id="edge")
        assert preview["counts"]["consumer.add"] == 120
        fetched = await s.http.get("/v1/admin/connections/edge", headers=ADMIN)
        health = await s.http.get("/integrations/apigee/health", headers=ADMIN)
        rows = []
        for table in ("connections", "connection_secrets", "audit_log"):
            rows += await s.db.fetch(f"SELECT row_to_json(t)::text AS row FROM {table} t")
        everything = [r["row"] for r in rows] + [created.text, fetched.text, health.text, caplog.text]
        assert len(rows) >= 3 and not any("edge-password-1" in text for text in everything)


async def test_enforce_quotas_makes_the_documented_calls_once(migrated_database, redis_url, prefix, apigee):
    apigee.state(**apigee_catalog(apps=3))
    async with stack(migrated_database, redis_url, prefix, secret_keys=KEYS) as s:
        await s.http.post("/integrations/apigee/connect", json=_connection(apigee), headers=ADMIN)
        plan = {"windows": {"hour": 500}, "price": 1000}
        assert (await s.http.put("/v1/admin/plans/gold-x", json=plan, headers=ADMIN)).status_code in (
            200,
            201,
        )
        ask = {"connection_id": "apigee", "product": "gold", "plan_id": "gold-x"}
        first = await s.http.post("/integrations/apigee/enforce/quotas", json=ask, headers=ADMIN)
        assert first.json() == {
            "product": "gold",
            "quota": {"quota": "500", "quotaInterval": "1", "quotaTimeUnit": "hour"},
            "result": "updated",
        }
        again = await s.http.post("/integrations/apigee/enforce/quotas", json=ask, headers=ADMIN)
        assert again.json()["result"] == "unchanged"
        calls = [(c["method"], c["path"]) for c in apigee.calls()]
        assert calls == [
            ("GET", "/apiproducts/gold"),
            ("PUT", "/apiproducts/gold"),
            ("GET", "/apiproducts/gold"),
        ]
        put = next(c["body"] for c in apigee.calls() if c["method"] == "PUT")
        assert (put["quota"], put["quotaInterval"], put["quotaTimeUnit"], put["name"]) == (
            "500",
            "1",
            "hour",
            "gold",
        )
        pushes = await s.db.fetch(
            "SELECT actor, after::text AS detail FROM audit_log WHERE action = 'apigee.enforce_quota'"
        )
        assert len(pushes) == 1 and '"updated"' in pushes[0]["detail"]

        # Bad asks change nothing and call nothing.
        two = {"windows": {"minute": 10, "day": 100}}
        await s.http.put("/v1/admin/plans/two", json=two, headers=ADMIN)
        bad = [
            ({**ask, "plan_id": "two"}, 400, "ambiguous_window"),
            ({**ask, "plan_id": None, "limit": 5}, 400, "invalid_request"),
            ({**ask, "plan_id": None, "limit": 5, "window": "fortnight"}, 400, "unknown_window"),
            ({**ask, "plan_id": None, "limit": -1, "window": "day"}, 400, "invalid_limit"),
            ({**ask, "plan_id": "nope"}, 404, "plan_not_found"),
            ({**ask, "connection_id": "other"}, 404, "connection_not_found"),
            ({**ask, "extra": 1}, 400, "invalid_field"),
        ]
        before = len(apigee.calls())
        for body, status, code in bad:
            response = await s.http.post("/integrations/apigee/enforce/quotas", json=body, headers=ADMIN)
            assert (response.status_code, response.json()["error"]["code"]) == (status, code), body
        assert len(apigee.calls()) == before
        # A plan's window named out of several; a product Apigee does not have is a 502.
        named = await s.http.post(
            "/integrations/apigee/enforce/quotas",
            json={**ask, "plan_id": "two", "window": "day"},
            headers=ADMIN,
        )
        assert named.json()["quota"] == {"quota": "100", "quotaInterval": "1", "quotaTimeUnit": "day"}
        missing = await s.http.post(
            "/integrations/apigee/enforce/quotas", json={**ask, "product": "platinum"}, headers=ADMIN
        )
        assert (missing.status_code, missing.json()["error"]["code"]) == (502, "gateway_not_found")
        unauthorized = await s.http.post("/integrations/apigee/enforce/quotas", json=ask)
        assert unauthorized.status_code == 401


async def test_a_suspension_is_pushed_to_apigee_as_a_revoked_app_and_read_back_as_a_suspension(
    migrated_database, redis_url, prefix, apigee
):
    catalog = apigee_catalog(apps=6, developers=3)
    apigee.state(**catalog)
    body = _connection(apigee, sync_interval_seconds=10)
    body["mapping"] |= {"push_status": True}
    async with stack(migrated_database, redis_url, prefix, secret_keys=KEYS) as s:
        await s.http.post("/integrations/apigee/connect", json=body, headers=ADMIN)
        await _sync(s.http, token=(await _sync(s.http))["token"])
        apigee.state(**catalog)  # forget the import's reads
        suspend = {"appId": "app-0004", "reason": "fraud review"}
        first = await s.http.post("/integrations/apigee/suspend", json=suspend, headers=ADMIN)
        assert (first.json()["status"], first.json()["pushed"]) == (
            "suspended",
            [{"connection_id": "apigee", "type": "apigee", "result": "updated"}],
        )
        again = await s.http.post("/integrations/apigee/suspend", json=suspend, headers=ADMIN)
        assert again.json()["pushed"][0]["result"] == "unchanged"
        writes = [(c["method"], c["path"], c["query"]) for c in apigee.calls() if c["method"] != "GET"]
        assert writes == [("POST", "/developers/dev-001@example.com/apps/app-4", {"action": "revoke"})]
        assert _app(apigee, "app-0004")["status"] == "revoked"

        # The next sync reads the revoked app back: still a suspension, its key kept.
        catalog_of = s.http._transport.app.state.catalog  # type: ignore[attr-defined]
        ledger = await catalog_of.ledger()
        store = ConnectionStore(ledger.pool, SecretBox(KEYS))
        await _make_due(s.db)
        assert await sync_loop.sync_due(store, ledger, catalog_of) == 1
        assert (await s.decide("app-0004"))["reason"] == "suspended"
        resumed = await s.http.post("/integrations/apigee/resume", json={"appId": "app-0004"}, headers=ADMIN)
        assert resumed.json()["pushed"][0]["result"] == "updated"
        by_key = await s.http.post("/v1/authorize", json={"api_key": app_key(4), "product": "api"})
        assert by_key.json()["allow"] is True
        assert _app(apigee, "app-0004")["status"] == "approved"
        audited = await s.db.fetchval(
            "SELECT count(*) FROM audit_log WHERE action = 'apigee.consumer_status'"
        )
        assert audited == 2

        # Apigee refusing the push: the sidecar's status still changes, the failure is told.
        apigee.faults(token="ya29.rotated-elsewhere")
        failed = await s.http.post("/v1/admin/consumers/app-0004/revoke", json={}, headers=ADMIN)
        assert (failed.status_code, failed.json()["status"]) == (200, "revoked")
        assert failed.json()["pushed"] == [
            {"connection_id": "apigee", "type": "apigee", "error": "unauthorized"}
        ]
        assert (await s.decide("app-0004"))["reason"] == "revoked"


async def test_a_bad_catalog_sync_is_refused_and_applies_nothing(
    migrated_database, redis_url, prefix, apigee
):
    apigee.state(**apigee_catalog(apps=3))
    async with stack(migrated_database, redis_url, prefix, secret_keys=KEYS) as s:
        await s.http.post("/integrations/apigee/connect", json=_connection(apigee), headers=ADMIN)
        kong = {"type": "kong", "base_url": "http://127.0.0.1:9"}
        await s.http.put("/v1/admin/connections/kong-1", json=kong, headers=ADMIN)
        bad = [
            ({"token": ""}, 400, "invalid_request"),
            ({"token": "0" * 32}, 409, "catalog_changed"),
            ({"connection_id": "kong-1"}, 404, "connection_not_found"),  # not an Apigee one
            ({"connection_id": "nope"}, 404, "connection_not_found"),
            ({"preview": True}, 400, "invalid_field"),
        ]
        for body, status, code in bad:
            response = await s.http.post("/integrations/apigee/catalog/sync", json=body, headers=ADMIN)
            assert (response.status_code, response.json()["error"]["code"]) == (status, code), body
        assert await s.db.fetchval("SELECT count(*) FROM consumers") == 0
