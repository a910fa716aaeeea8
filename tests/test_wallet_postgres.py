"""The wallet lifecycle with Postgres as the truth: ingested usage settled into the
ledger once, wallet notices drained into wallet_notices, a hold that survives a full
sync, a credit made in Postgres that lifts it, wallet rules kept in the consumers table;
on Redis in each topology with a real reconciler process."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from tests.conftest import ADMIN, seed, until
from tests.test_ingest import _analytics
from tests.test_postgres import reconcile_once, stack
from tests.test_wallet_rules import AUTH, CENT, SECRET, kong_log, notices, top_up, view

pytestmark = pytest.mark.slow


async def test_ingested_usage_is_settled_once_and_the_hold_survives_a_full_sync(
    migrated_database, deployment_url, prefix, reconciler
):
    async with stack(migrated_database, deployment_url, prefix, ingest_secrets={"default": SECRET}) as s:
        await seed(s.http, plan_id="metered", windows={"day": 10_000}, price=CENT, consumer_id="app-1")
        await top_up(s.http, "app-1", 50 * CENT)
        logs = [kong_log("app-1", f"req-{i:04d}") for i in range(1000)]

        async def post(batch: list[dict]) -> None:
            response = await s.http.post("/integrations/kong/ingest", json=batch, headers=AUTH)
            assert response.status_code == 202, response.text

        # 4 gateways, every batch sent twice.
        await asyncio.gather(*(post(logs[i : i + 100]) for i in range(0, 1000, 100) for _ in range(2)))
        reconciler(migrated_database, deployment_url, prefix)

        async def settled() -> bool:
            balance = await s.db.fetchval("SELECT balance FROM wallets WHERE consumer_id = 'app-1'")
            return balance == 50 * CENT - 1000 * CENT

        await until(settled, 15, "the drain of the rated usage")
        rows = await s.db.fetch(
            "SELECT count(*) AS n, sum(cost) AS cost, sum(hits) AS hits, min(decision_id) AS did "
            "FROM usage_records WHERE consumer_id = 'app-1'"
        )
        assert (rows[0]["n"], rows[0]["cost"], rows[0]["hits"]) == (1000, 1000 * CENT, 1000)
        assert rows[0]["did"].startswith("ev:")

        async def drained() -> bool:
            return await s.db.fetchval("SELECT count(*) FROM wallet_notices") == 1

        await until(drained, 15, "the drain of the wallet notices")
        notice = await s.db.fetchrow("SELECT type, balance FROM wallet_notices WHERE consumer_id = 'app-1'")
        assert (notice["type"], notice["balance"]) == ("suspended", 0)
        # The API shows the drained notice once (Postgres), not again from Redis.
        assert [(n["type"], n["balance"]) for n in await notices(s.http, "app-1")] == [("suspended", 0)]

        # A full sync writes the consumer from Postgres again: the hold is the wallet's own
        # state in Redis, apart from the admin status, so it stays.
        result = await asyncio.to_thread(reconcile_once, migrated_database, deployment_url, prefix)
        assert result.returncode == 0, result.stderr
        consumer = await view(s.http, "app-1")
        assert (consumer["status"], consumer["status_reason"]) == ("suspended", "wallet_empty")
        assert (await s.decide("app-1"))["reason"] == "insufficient_balance"

        # A credit written straight into Postgres reaches Redis through NOTIFY and lifts it.
        async with s.db.acquire() as conn, conn.transaction():
            await conn.execute(
                """UPDATE wallets SET balance = balance + $1, version = version + 1
                   WHERE consumer_id = 'app-1'""",
                1000 * CENT,
            )

        async def resumed() -> bool:
            return (await view(s.http, "app-1"))["status"] == "active"

        await until(resumed, 5, "the hold lifted by a credit made in Postgres")
        assert (await view(s.http, "app-1"))["balance"] == 50 * CENT
        assert (await s.decide("app-1"))["allow"]


async def test_an_apigee_bucket_ingested_again_hours_later_is_charged_once(
    migrated_database, deployment_url, prefix, reconciler
):
    async with stack(migrated_database, deployment_url, prefix, ingest_secrets={"default": SECRET}) as s:
        await seed(
            s.http, plan_id="premium", windows={"month": 100_000}, price=CENT, consumer_id="app-acme-mobile"
        )
        await top_up(s.http, "app-acme-mobile", 1000 * CENT)
        payload = _analytics(hours_ago=2)
        first = await s.http.post("/integrations/apigee/ingest", json=payload, headers=AUTH)
        assert first.json()["recordsProcessed"] == 2
        reconciler(migrated_database, deployment_url, prefix)

        async def drained() -> bool:
            return await s.db.fetchval("SELECT count(*) FROM usage_records") == 1

        await until(drained, 15, "the drain")
        await until(lambda: _stream_empty(s), 15, "the trim of the usage stream")
        # The re-read of apigee-pull's late-data window, after the first copy has left Redis.
        again = await s.http.post("/integrations/apigee/ingest", json=payload, headers=AUTH)
        assert again.json() == {"status": "ok", "recordsProcessed": 0, "recordsSkipped": 2}
        await asyncio.sleep(0.5)  # a drain pass or more
        assert await s.db.fetchval("SELECT count(*) FROM usage_records") == 1
        assert (
            await s.db.fetchval("SELECT count(*) FROM gateway_events WHERE consumer_id = 'app-acme-mobile'")
            == 1
        )
        balance = await s.db.fetchval("SELECT balance FROM wallets WHERE consumer_id = 'app-acme-mobile'")
        assert balance == 1000 * CENT - 120 * CENT  # 120 messages at 0.01, once
        assert (await view(s.http, "app-acme-mobile"))["windows"]["month"] == 120


async def _stream_empty(s) -> bool:
    return await s.store.usage("default", "app-acme-mobile") == []


async def test_wallet_rules_are_kept_in_postgres_and_restored_by_a_full_sync(
    migrated_database, deployment_url, prefix
):
    async with stack(migrated_database, deployment_url, prefix) as s:
        await seed(s.http, plan_id="metered", price=CENT, consumer_id="app-1")
        rules = {
            "suspend_at_zero": False,
            "auto_topup": {"threshold": 5 * CENT, "amount": CENT, "currency": "GBP"},
        }
        response = await s.http.put(
            "/v1/admin/consumers/app-1", json={"plan_id": "metered", **rules}, headers=ADMIN
        )
        assert response.status_code == 200, response.text
        row = await s.db.fetchrow("SELECT suspend_at_zero, auto_topup::text AS auto_topup FROM consumers")
        assert row["suspend_at_zero"] is False
        assert msgspec.json.decode(row["auto_topup"]) == {"enabled": True, **rules["auto_topup"]}
        # Redis loses the consumer; the full sync brings it back with its rules.
        await s.store.client.delete(f"{prefix}{{default:app-1}}:c")
        result = await asyncio.to_thread(reconcile_once, migrated_database, deployment_url, prefix)
        assert result.returncode == 0, result.stderr
        consumer = await view(s.http, "app-1")
        assert consumer["suspend_at_zero"] is False
        assert consumer["auto_topup"] == {"enabled": True, **rules["auto_topup"]}
