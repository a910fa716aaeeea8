"""Deletions with Postgres as the truth: soft deletes that keep the billing history,
and removal from Redis by every path (the admin API, SQL with the change feed, and a
full sync that finds what the truth no longer has). Real Postgres, real Redis in each
topology, real reconciler processes."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.core.clock import now_ms
from sidecar.core.models import ConsumerKey, ConsumerSpec, Plan
from tests.conftest import ADMIN, seed, until
from tests.test_postgres import Stack, _reason, reconcile_once, stack

pytestmark = pytest.mark.slow


async def _keyed(s: Stack, raw: str) -> str:
    response = await s.http.post("/v1/authorize", json={"api_key": raw, "product": "api"})
    return response.json()["reason"]


async def _seed_with_usage(s: Stack, calls: int) -> str:
    """c1 (prepaid 1.00 at 0.01) with a key and ``calls`` allowed decisions; the raw key."""
    await seed(s.http, windows={"day": 100}, price=10_000, balance=1_000_000, consumer_id="c1")
    raw = (await s.http.post("/v1/admin/consumers/c1/keys", json={}, headers=ADMIN)).json()["api_key"]
    for i in range(calls):
        assert (await s.decide("c1", request_id=f"r{i}"))["reason"] == "ok"
    assert await _keyed(s, raw) == "ok"
    return raw


async def test_a_consumer_deleted_through_the_api_keeps_its_billing_history(
    migrated_database, deployment_url, prefix, reconciler
):
    async with stack(migrated_database, deployment_url, prefix) as s:
        reconciler(migrated_database, deployment_url, prefix)
        raw = await _seed_with_usage(s, 3)

        async def drained() -> bool:
            return await s.db.fetchval("SELECT count(*) FROM usage_records WHERE consumer_id = 'c1'") == 4

        await until(drained, 10, "the decisions in the ledger")
        response = await s.http.delete("/v1/admin/consumers/c1", headers=ADMIN)
        assert response.status_code == 200, response.text
        assert (await s.decide("c1"))["reason"] == "unknown_consumer"
        assert await _keyed(s, raw) == "invalid_key"
        row = await s.db.fetchrow("SELECT deleted_at, status FROM consumers WHERE id = 'c1'")
        assert row["deleted_at"] is not None
        assert await s.db.fetchval("SELECT count(*) FROM usage_records WHERE consumer_id = 'c1'") == 4
        assert (
            await s.db.fetchval("SELECT balance FROM wallets WHERE consumer_id = 'c1'") == 1_000_000 - 40_000
        )
        assert await s.db.fetchval("SELECT count(*) FROM api_keys WHERE revoked_at IS NULL") == 0
        audit = await s.db.fetchrow(
            "SELECT actor, after FROM audit_log WHERE action = 'consumers.update' ORDER BY id DESC LIMIT 1"
        )
        assert audit["actor"].startswith("admin-token@") and '"deleted_at": "' in audit["after"]
        # Restored by writing it again: its wallet (history and balance) comes back.
        await seed(s.http, windows={"day": 100}, price=10_000, consumer_id="c1")
        back = await s.decide("c1")
        assert (back["reason"], back["balance"]) == ("ok", 1_000_000 - 50_000)


async def test_a_consumer_deleted_in_sql_stops_deciding_within_a_second(
    migrated_database, deployment_url, prefix, reconciler
):
    async with stack(migrated_database, deployment_url, prefix) as s:
        reconciler(migrated_database, deployment_url, prefix)
        raw = await _seed_with_usage(s, 1)
        await s.db.execute("UPDATE consumers SET deleted_at = now() WHERE id = 'c1'")
        took = await until(_reason(s, "c1", "unknown_consumer"), 1.0, "the SQL deletion to refuse")
        assert took < 1.0
        assert await _keyed(s, raw) == "invalid_key"
        assert await s.store.get_consumer("default", "c1", now_ms()) is None


async def test_the_full_sync_removes_what_postgres_no_longer_has(migrated_database, deployment_url, prefix):
    """No reconciler runs while the truth changes (NOTIFY is heard by nobody); the next
    full sync removes from Redis the consumer and plan deleted in SQL, and a consumer,
    plan and key only Redis ever had, and drains the deleted consumer's usage first."""
    async with stack(migrated_database, deployment_url, prefix) as s:
        raw = await _seed_with_usage(s, 2)
        assert (await s.http.put("/v1/admin/plans/unused", json={}, headers=ADMIN)).status_code == 201
        await s.db.execute("UPDATE consumers SET deleted_at = now() WHERE id = 'c1'")
        await s.db.execute("UPDATE plans SET deleted_at = now() WHERE id = 'unused'")
        await s.store.put_plan(Plan(id="ghost-plan").validated())
        await s.store.put_consumer(ConsumerSpec(id="ghost", plan_id="ghost-plan").validated(), now_ms())
        await s.store.add_key("default", "ghost", ConsumerKey("e" * 64))
        assert (await s.decide("c1"))["reason"] == "ok"  # nobody told Redis yet: it still decides
        assert (await s.decide("ghost"))["reason"] == "ok"

        result = await asyncio.to_thread(reconcile_once, migrated_database, deployment_url, prefix)
        assert result.returncode == 0, result.stderr
        assert (await s.decide("c1"))["reason"] == "unknown_consumer"
        assert await _keyed(s, raw) == "invalid_key"
        assert (await s.decide("ghost"))["reason"] == "unknown_consumer"
        assert await s.store.resolve_key("default", "e" * 64) is None
        assert await s.store.get_plan("default", "unused") is None
        assert await s.store.get_plan("default", "ghost-plan") is None
        assert [p.id for p in (await s.store.list_plans("default", None, 10))[0]] == ["plan"]
        assert (await s.store.list_consumers("default", None, 10, now_ms()))[0] == []
        # The deleted consumer's usage reached the ledger, and left Redis after.
        assert await s.db.fetchval("SELECT count(*) FROM usage_records WHERE consumer_id = 'c1'") == 4
        assert await s.store.usage("default", "c1") == []
        # The consumer Postgres never had: its usage is in the ledger, charged to no wallet.
        assert await s.db.fetchval("SELECT count(*) FROM usage_records WHERE consumer_id = 'ghost'") == 1
        assert await s.db.fetchval("SELECT count(*) FROM wallets WHERE consumer_id = 'ghost'") == 0
        assert await s.store.usage("default", "ghost") == []
        assert "a consumer Postgres never had" in result.stderr
