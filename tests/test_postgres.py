"""Postgres as the truth: migrations, audited admin writes, the change feed, the usage
drain under SIGKILL, settlement racing top-ups, the audit chain, the report.
Real Postgres (a database per test), real Redis, real reconciler processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable

import asyncpg
import httpx
import pytest

from sidecar.authorizer import Authorizer
from sidecar.config import Settings
from sidecar.core.clock import now_ms
from sidecar.core.models import AuthorizeRequest
from sidecar.reconciler.migrations import migrate
from sidecar.server import build_app
from sidecar.store.redis_store import RedisStore
from tests.conftest import ADMIN, make_settings, seed, until

pytestmark = pytest.mark.slow


class Stack:
    """A sidecar (in process, Postgres-backed admin API) over Redis and Postgres."""

    def __init__(
        self, http: httpx.AsyncClient, store: RedisStore, settings: Settings, db: asyncpg.Pool
    ) -> None:
        self.http = http
        self.store = store
        self.settings = settings
        self.db = db
        self.authorizer: Authorizer = http._transport.app.state.authorizer  # type: ignore[attr-defined]

    async def decide(self, consumer_id: str, **fields) -> dict:
        response = await self.http.post(
            "/v1/authorize", json={"consumer_id": consumer_id, "product": "api", **fields}
        )
        return response.json()


@contextlib.asynccontextmanager
async def stack(database_url: str, redis_url: str, prefix: str, **overrides) -> AsyncIterator[Stack]:
    settings = make_settings(
        redis_url=redis_url, key_prefix=prefix, database_url=database_url, grpc_port=0, **overrides
    )
    store = RedisStore(redis_url, prefix=prefix)
    app = build_app(settings, store)
    db = await asyncpg.create_pool(database_url, min_size=0, max_size=4)
    try:
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sidecar") as http,
        ):
            yield Stack(http, store, settings, db)
    finally:
        await db.close()
        await store.close()


# --- schema ------------------------------------------------------------------------


async def test_migrations_apply_to_an_empty_database_and_reapply_as_a_no_op(database_url):
    conn = await asyncpg.connect(database_url)
    try:
        assert await migrate(conn) == [
            "0001_schema.sql",
            "0002_event_counts.sql",
            "0003_ledger_per_decision.sql",
            "0004_soft_delete.sql",
            "0005_wallet_rules.sql",
            "0006_connections.sql",
            "0007_api_tokens.sql",
            "0008_api_key_scopes.sql",
            "0009_alerts_webhooks.sql",
            "0010_usage_rollups.sql",
            "0011_partitioned_ledger.sql",
            "0012_gateway_drift.sql",
        ]
        tables = {
            r["tablename"]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        }
        assert {"plans", "consumers", "api_keys", "wallets", "wallet_transactions", "usage_records"} <= tables
        assert {"gateway_events", "audit_log", "tenants", "schema_migrations", "wallet_notices"} <= tables
        assert {"connections", "connection_secrets", "api_tokens"} <= tables
        assert {"alerts", "webhooks", "webhook_deliveries", "webhook_attempts"} <= tables
        assert {"usage_rollup_hourly", "usage_rollup_daily", "usage_records_default"} <= tables
        assert {"alert_rules", "gateway_drift_runs", "gateway_drift_rows"} <= tables
        assert await migrate(conn) == []
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == 12
        # An applied migration edited afterwards is refused, not skipped.
        await conn.execute("UPDATE schema_migrations SET checksum = 'x'")
        with pytest.raises(Exception, match="applied with different content"):
            await migrate(conn)
    finally:
        await conn.close()


def test_migrate_command_is_idempotent(migrated_database):
    again = subprocess.run(
        [sys.executable, "-m", "sidecar.cli", "migrate", "--database-url", migrated_database],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0 and "nothing to apply" in again.stdout


def reconcile_once(database_url: str, redis_url: str, prefix: str) -> subprocess.CompletedProcess[str]:
    """``aforo-sidecar reconcile --once``: one full sync and a complete drain."""
    return _cli(
        "reconcile",
        "--once",
        "--database-url",
        database_url,
        "--redis-url",
        redis_url,
        "--key-prefix",
        prefix,
    )


def test_the_reconciler_refuses_an_unmigrated_database(database_url, redis_url, prefix):
    result = reconcile_once(database_url, redis_url, prefix)
    assert result.returncode == 2 and "aforo-sidecar migrate" in result.stderr


# --- admin writes go to Postgres first, audited ------------------------------------


async def test_admin_writes_land_in_postgres_with_their_audit_rows(migrated_database, deployment_url, prefix):
    async with stack(migrated_database, deployment_url, prefix) as s:
        await seed(s.http, windows={"day": 5}, price=100, balance=1_000, consumer_id="c1")
        assert (
            await s.http.post("/v1/admin/consumers/c1/suspend", json={}, headers=ADMIN)
        ).status_code == 200
        created = await s.http.post("/v1/admin/consumers/c1/keys", json={}, headers=ADMIN)
        key_hash = created.json()["key_hash"]
        row = await s.db.fetchrow("SELECT status, plan_id FROM consumers WHERE id = 'c1'")
        assert (row["status"], row["plan_id"]) == ("suspended", "plan")
        assert await s.db.fetchval("SELECT balance FROM wallets WHERE consumer_id = 'c1'") == 1_000
        assert await s.db.fetchval("SELECT key_hash FROM api_keys WHERE consumer_id = 'c1'") == key_hash
        audit = await s.db.fetch("SELECT actor, action, before, after FROM audit_log ORDER BY id")
        actions = [r["action"] for r in audit]
        assert actions == [
            "plans.insert", "consumers.insert", "wallets.insert", "wallets.update", "consumers.update",
            "api_keys.insert",
        ]  # fmt: skip
        assert all(r["actor"].startswith("admin-token@") for r in audit)
        suspension = audit[4]
        assert '"status": "active"' in suspension["before"] and '"status": "suspended"' in suspension["after"]
        assert (await s.decide("c1"))["reason"] == "suspended"


async def test_postgres_down_admin_writes_fail_cleanly_and_decisions_go_on(
    private_postgres, redis_url, prefix
):
    url = private_postgres.url
    conn = await asyncpg.connect(url)
    await migrate(conn)
    await conn.close()
    async with stack(url, redis_url, prefix) as s:
        await seed(s.http, windows={"day": 5}, consumer_id="c1")
        private_postgres.stop()
        try:
            response = await s.http.post("/v1/admin/consumers/c1/suspend", json={}, headers=ADMIN)
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "database_unavailable"
            # Redis was not touched: the consumer is still active, and decisions go on.
            decision = await s.decide("c1")
            assert (decision["reason"], decision["degraded"]) == ("ok", False)
        finally:
            private_postgres.start()
        response = await s.http.post("/v1/admin/consumers/c1/suspend", json={}, headers=ADMIN)
        assert response.status_code == 200
        assert (await s.decide("c1"))["reason"] == "suspended"


# --- the change feed ---------------------------------------------------------------


async def test_sql_changes_reach_decisions_within_a_second(
    migrated_database, deployment_url, prefix, reconciler
):
    async with stack(migrated_database, deployment_url, prefix) as s:
        await seed(s.http, windows={"day": 100}, consumer_id="c1")
        reconciler(migrated_database, deployment_url, prefix)
        assert (await s.decide("c1"))["allow"]
        await asyncio.sleep(0.5)  # the reconciler is up and listening

        await s.db.execute("""UPDATE plans SET windows = '{"day": 1}' WHERE id = 'plan'""")
        took = await until(_reason(s, "c1", "quota_exceeded"), 1.0, "the lowered limit to deny")
        assert took < 1.0

        await s.db.execute("""UPDATE plans SET windows = '{"day": 100}' WHERE id = 'plan'""")
        await s.db.execute("UPDATE consumers SET status = 'suspended' WHERE id = 'c1'")
        took = await until(_reason(s, "c1", "suspended"), 1.0, "the SQL suspension to refuse")
        assert took < 1.0
        # The billing job's suspension is audited under its database user.
        actor = await s.db.fetchval(
            "SELECT actor FROM audit_log WHERE action = 'consumers.update' ORDER BY id DESC LIMIT 1"
        )
        assert actor == "postgres"

        await s.db.execute("UPDATE consumers SET status = 'active' WHERE id = 'c1'")
        await until(_reason(s, "c1", "ok"), 1.0, "the SQL resume")


def _reason(s: Stack, consumer_id: str, reason: str) -> Callable[[], object]:
    async def check() -> bool:
        return (await s.decide(consumer_id))["reason"] == reason

    return check


async def test_a_consumer_created_in_sql_gets_its_plan_and_key(
    migrated_database, deployment_url, prefix, reconciler
):
    async with stack(migrated_database, deployment_url, prefix) as s:
        reconciler(migrated_database, deployment_url, prefix)
        await asyncio.sleep(0.5)
        async with s.db.acquire() as conn, conn.transaction():
            await conn.execute("INSERT INTO tenants (id) VALUES ('default')")
            await conn.execute(
                """INSERT INTO plans (tenant, id, windows, price)
                   VALUES ('default', 'sqlplan', '{"minute": 10}', 5)"""
            )
            await conn.execute(
                "INSERT INTO consumers (tenant, id, plan_id) VALUES ('default', 'sqluser', 'sqlplan')"
            )
            await conn.execute("UPDATE wallets SET balance = 12 WHERE consumer_id = 'sqluser'")
            await conn.execute(
                "INSERT INTO api_keys (tenant, key_hash, consumer_id) VALUES ('default', $1, 'sqluser')",
                __import__("hashlib").sha256(b"ak_sql_created_key").hexdigest(),
            )
        await until(_reason(s, "sqluser", "ok"), 1.0, "the SQL-created consumer")
        by_key = await s.http.post("/v1/authorize", json={"api_key": "ak_sql_created_key", "product": "api"})
        assert (by_key.json()["reason"], by_key.json()["consumer_id"]) == ("ok", "sqluser")
        assert (await s.decide("sqluser"))["reason"] == "insufficient_balance"  # 12 - 5 - 5 = 2 < 5


# --- the usage drain ---------------------------------------------------------------


async def _decide_many(
    authorizer: Authorizer, consumer_id: str, costs: list[int], concurrency: int = 64
) -> list:
    """One decision per cost (None: the plan's price), each with its own request id."""
    batch = uuid.uuid4().hex[:8]
    pending = list(enumerate(costs))
    decisions = []

    async def worker() -> None:
        while pending:
            i, cost = pending.pop()
            request = AuthorizeRequest(
                consumer_id=consumer_id, product="api", cost=cost, request_id=f"r-{batch}-{i}"
            )
            decisions.append(await authorizer.authorize(request.validated()))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return decisions


async def test_drain_survives_sigkill_three_times_exactly(
    migrated_database, deployment_url, prefix, reconciler
):
    start_balance = 10_000_000_000
    costs = [1 + (i * 7919) % 997 for i in range(20_000)]
    async with stack(migrated_database, deployment_url, prefix, decision_timeout_ms=10_000) as s:
        await seed(s.http, windows={"month": 1_000_000}, balance=start_balance, consumer_id="c1")
        decisions = await _decide_many(s.authorizer, "c1", costs)
        assert sum(d.allow for d in decisions) == 20_000
        assert sum(d.charged for d in decisions) == sum(costs)

        async def rows() -> int:
            return await s.db.fetchval("SELECT count(*) FROM usage_records")

        # Small batches so that every kill lands in the middle of the drain.
        for kill in range(3):
            process = reconciler(migrated_database, deployment_url, prefix, AFORO_DRAIN_BATCH="150")
            before = await rows()
            await until(lambda before=before: _more_than(rows, before + 500), 60, "the drain to progress")
            process.kill()
            assert 0 < await rows() < 20_000, f"kill {kill} did not land during the drain"
        reconciler(migrated_database, deployment_url, prefix, AFORO_DRAIN_BATCH="150")
        await until(lambda: _equals(rows, 20_000), 120, "all usage to arrive")
        await until(lambda: _stream_empty(s.store), 30, "the stream to be trimmed")

        assert await rows() == 20_000
        assert await s.db.fetchval("SELECT count(DISTINCT request_id) FROM usage_records") == 20_000
        assert await s.db.fetchval("SELECT sum(cost) FROM usage_records") == sum(costs)
        wallet = await s.db.fetchrow("SELECT balance, settled_debits FROM wallets WHERE consumer_id = 'c1'")
        assert wallet["balance"] == start_balance - sum(costs)
        assert wallet["settled_debits"] == sum(costs)
        debits = await s.db.fetchval("SELECT -sum(amount) FROM wallet_transactions WHERE kind = 'usage'")
        assert debits == sum(costs)
        view = await s.store.get_consumer("default", "c1", now_ms())
        assert (view.balance, view.pending) == (start_balance - sum(costs), 0)


async def test_a_request_id_decided_again_after_its_window_is_charged_alike_on_both_sides(
    migrated_database, redis_url, prefix, reconciler
):
    """Inside idempotency_ttl_seconds a retry is replayed; after it, the same request id
    is a new decision, counted and charged in Redis, so the ledger must hold it too."""
    async with stack(migrated_database, redis_url, prefix, idempotency_ttl_seconds=1) as s:
        await seed(s.http, windows={"day": 100}, price=700, balance=10_000, consumer_id="c1")
        first = await s.decide("c1", request_id="r-1")
        replay = await s.decide("c1", request_id="r-1")
        assert (first["charged"], replay["replayed"], replay["decision_id"]) == (
            700,
            True,
            first["decision_id"],
        )
        await asyncio.sleep(1.2)  # the idempotency window has passed
        again = await s.decide("c1", request_id="r-1")
        assert not again["replayed"] and again["decision_id"] != first["decision_id"]
        reconciler(migrated_database, redis_url, prefix)

        async def settled() -> bool:
            view = await s.store.get_consumer("default", "c1", now_ms())
            return view.pending == 0

        await until(settled, 10, "the drain")
        rows = await s.db.fetch("SELECT decision_id FROM usage_records WHERE request_id = 'r-1'")
        assert {r["decision_id"] for r in rows} == {first["decision_id"], again["decision_id"]}
        pg = await s.db.fetchval("SELECT balance FROM wallets WHERE consumer_id = 'c1'")
        view = await s.store.get_consumer("default", "c1", now_ms())
        assert pg == view.balance == 10_000 - 2 * 700


async def test_streams_marked_dirty_drain_without_waiting_for_a_scan(
    migrated_database, deployment_url, prefix, reconciler
):
    async with stack(migrated_database, deployment_url, prefix) as s:
        await seed(s.http, windows={"day": 1000}, consumer_id="c1")
        reconciler(migrated_database, deployment_url, prefix, AFORO_STREAM_SCAN_INTERVAL_SECONDS="3600")
        await asyncio.sleep(1)  # past the reconciler's start-up scan

        async def rows() -> int:
            return await s.db.fetchval("SELECT count(*) FROM usage_records")

        for _ in range(5):
            assert (await s.decide("c1"))["allow"]
        took = await until(lambda: _equals(rows, 5), 5, "the marked stream to drain")
        assert took < 3  # the flush (100 ms) plus a drain pass, not the hour-long scan


async def test_a_lost_dirty_mark_only_delays_a_stream_until_the_next_scan(
    migrated_database, deployment_url, prefix, reconciler
):
    async with stack(migrated_database, deployment_url, prefix) as s:
        await seed(s.http, windows={"day": 1000}, consumer_id="c1")
        reconciler(migrated_database, deployment_url, prefix, AFORO_STREAM_SCAN_INTERVAL_SECONDS="2")
        await asyncio.sleep(1)
        # A store that never flushes its marks: as if its process died right after.
        silent = RedisStore(deployment_url, prefix=prefix)
        try:
            authorizer = Authorizer(silent, s.settings)
            decisions = await _decide_many(authorizer, "c1", [None] * 7)
            assert all(d.allow for d in decisions)
        finally:
            await silent.close()

        async def rows() -> int:
            return await s.db.fetchval("SELECT count(*) FROM usage_records")

        await until(lambda: _equals(rows, 7), 10, "the periodic scan to find the stream")


async def _more_than(count: Callable[[], object], floor: int) -> bool:
    return await count() > floor  # type: ignore[misc]


async def _equals(count: Callable[[], object], value: int) -> bool:
    return await count() == value  # type: ignore[misc]


async def _stream_empty(store: RedisStore) -> bool:
    return await store.usage("default", "c1") == []


async def test_topups_in_postgres_racing_debits_agree_to_the_micro(
    migrated_database, deployment_url, prefix, reconciler
):
    async with stack(migrated_database, deployment_url, prefix, decision_timeout_ms=10_000) as s:
        await seed(s.http, windows={"day": 1_000_000}, price=997, balance=500_000, consumer_id="c1")
        reconciler(migrated_database, deployment_url, prefix)
        await asyncio.sleep(0.5)

        async def top_ups() -> int:
            credited = 0
            for i in range(10):
                amount = 100_000 + i
                async with s.db.acquire() as conn, conn.transaction():
                    await conn.execute(
                        """INSERT INTO wallet_transactions (tenant, consumer_id, kind, amount, reference)
                           VALUES ('default', 'c1', 'topup', $1, $2)""",
                        amount,
                        f"billing-{i}",
                    )
                    await conn.execute(
                        "UPDATE wallets SET balance = balance + $1 WHERE consumer_id = 'c1'", amount
                    )
                credited += amount
                await asyncio.sleep(0.05)
            return credited

        async def debits() -> list:
            results = []
            for _ in range(15):
                results += await _decide_many(s.authorizer, "c1", [None] * 150, concurrency=16)  # type: ignore[list-item]
            return results

        credited, decisions = await asyncio.gather(top_ups(), debits())
        charged = sum(d.charged for d in decisions)
        assert charged == 997 * sum(d.allow for d in decisions) and charged > 0

        async def settled() -> bool:
            view = await s.store.get_consumer("default", "c1", now_ms())
            pg = await s.db.fetchval("SELECT balance FROM wallets WHERE consumer_id = 'c1'")
            return view.pending == 0 and view.balance == pg

        await until(settled, 30, "Redis and Postgres to settle")
        expected = 500_000 + credited - charged
        assert await s.db.fetchval("SELECT balance FROM wallets WHERE consumer_id = 'c1'") == expected
        view = await s.store.get_consumer("default", "c1", now_ms())
        assert view.balance == expected


async def test_postgres_stopped_30s_under_load_loses_no_usage(
    private_postgres, redis_url, prefix, reconciler
):
    url = private_postgres.url
    conn = await asyncpg.connect(url)
    await migrate(conn)
    await conn.close()
    async with stack(url, redis_url, prefix, decision_timeout_ms=10_000) as s:
        await seed(s.http, windows={"month": 1_000_000}, price=3, balance=10_000_000, consumer_id="c1")
        reconciler(url, redis_url, prefix)
        decisions = await _decide_many(s.authorizer, "c1", [None] * 500)  # type: ignore[list-item]
        private_postgres.stop()
        outage_started = time.monotonic()
        while time.monotonic() - outage_started < 30:
            decisions += await _decide_many(s.authorizer, "c1", [None] * 200, concurrency=8)  # type: ignore[list-item]
            await asyncio.sleep(0.2)
        outage_decisions = len(decisions) - 500
        assert outage_decisions > 1_000
        assert all(d.allow and not d.degraded for d in decisions), "a decision failed because of Postgres"
        private_postgres.start()
        total = len(decisions)
        pool = await asyncpg.create_pool(url, min_size=0, max_size=2)
        try:

            async def rows() -> int:
                return await pool.fetchval("SELECT count(*) FROM usage_records")

            await until(lambda: _equals(rows, total), 60, "the usage made during the outage")
            assert (
                await pool.fetchval("SELECT balance FROM wallets WHERE consumer_id = 'c1'")
                == 10_000_000 - 3 * total
            )
        finally:
            await pool.close()


# --- gateway events ----------------------------------------------------------------


async def test_gateway_events_reach_postgres_once(migrated_database, deployment_url, prefix, reconciler):
    async with stack(migrated_database, deployment_url, prefix) as s:
        await seed(s.http, consumer_id="c1")
        events = [
            {"consumer_id": "c1", "request_id": f"e-{i}", "status": 200, "response_size": i}
            for i in range(30)
        ]
        for _ in range(3):  # the gateway resent its batch
            assert (await s.http.post("/v1/usage", json=events)).status_code == 200
        reconciler(migrated_database, deployment_url, prefix)

        async def rows() -> int:
            return await s.db.fetchval("SELECT count(*) FROM gateway_events")

        await until(lambda: _equals(rows, 30), 10, "the events")
        await asyncio.sleep(0.3)
        assert await rows() == 30
        assert await s.db.fetchval("SELECT sum(response_size) FROM gateway_events") == sum(range(30))


# --- audit and report --------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AFORO_")}
    return subprocess.run(
        [sys.executable, "-m", "sidecar.cli", *args], capture_output=True, text=True, env=env, timeout=60
    )


async def test_audit_verify_detects_an_edited_row(migrated_database, redis_url, prefix):
    async with stack(migrated_database, redis_url, prefix) as s:
        await seed(s.http, windows={"day": 5}, balance=100, consumer_id="c1")
        await s.http.post("/v1/admin/consumers/c1/suspend", json={}, headers=ADMIN)
        clean = await asyncio.to_thread(_cli, "audit", "verify", "--database-url", migrated_database)
        assert clean.returncode == 0 and "0 problems" in clean.stdout
        # The table refuses edits...
        with pytest.raises(asyncpg.RaiseError, match="append-only"):
            await s.db.execute("UPDATE audit_log SET actor = 'someone-else' WHERE id = 2")
        # ...so a tamperer has to switch the guard off first; the chain still tells.
        async with s.db.acquire() as conn, conn.transaction():
            await conn.execute("ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only")
            await conn.execute(
                """UPDATE audit_log SET after = jsonb_set(after, '{status}', '"active"') WHERE id = 5"""
            )
            await conn.execute("ALTER TABLE audit_log ENABLE TRIGGER audit_log_append_only")
        tampered = await asyncio.to_thread(_cli, "audit", "verify", "--database-url", migrated_database)
        assert tampered.returncode == 1
        assert "audit row 5: content does not match its hash" in tampered.stdout
        # A deleted row breaks the link of the next one.
        async with s.db.acquire() as conn, conn.transaction():
            await conn.execute("ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only")
            await conn.execute("DELETE FROM audit_log WHERE id = 3")
            await conn.execute("ALTER TABLE audit_log ENABLE TRIGGER audit_log_append_only")
        deleted = await asyncio.to_thread(_cli, "audit", "verify", "--database-url", migrated_database)
        assert "audit row 4: does not follow the previous row" in deleted.stdout


async def test_reconciliation_report_flags_drift(migrated_database, deployment_url, prefix, reconciler):
    async with stack(migrated_database, deployment_url, prefix) as s:
        await seed(s.http, windows={"day": 1000, "minute": 1000}, consumer_id="c1")
        await seed(s.http, plan_id="plan2", windows={"day": 1000}, consumer_id="c2")
        for consumer in ("c1", "c2"):
            for _ in range(100):
                assert (await s.decide(consumer))["allow"]
        clean = (await s.http.get("/v1/admin/reconciliation", headers=ADMIN)).json()
        c1_day = next(r for r in clean["rows"] if r["consumer_id"] == "c1" and r["window"] == "day")
        assert (c1_day["redis"], c1_day["postgres"], c1_day["in_flight"], c1_day["flagged"]) == (
            100,
            0,
            100,
            False,
        )
        assert clean["flagged"] == 0
        # 3 calls counted in Redis that no ledger knows of: 3% drift on c2, above 2%.
        day_start = next(r for r in clean["rows"] if r["consumer_id"] == "c2")["period_start"] * 1000
        await s.store.client.incrby(f"{prefix}{{default:c2}}:q:day:{day_start}", 3)
        reconciler(migrated_database, deployment_url, prefix)

        async def drained() -> bool:
            return await s.db.fetchval("SELECT count(*) FROM usage_records") == 200

        await until(drained, 10, "the drain")
        result = await asyncio.to_thread(
            _cli, "reconcile", "--report", "--json", "--database-url", migrated_database,
            "--redis-url", deployment_url, "--key-prefix", prefix,
        )  # fmt: skip
        assert result.returncode == 1  # something is flagged
        report = __import__("json").loads(result.stdout)
        flagged = [(r["consumer_id"], r["window"], r["drift"]) for r in report["rows"] if r["flagged"]]
        assert flagged == [("c2", "day", 3)]
        c1_rows = {r["window"]: r for r in report["rows"] if r["consumer_id"] == "c1"}
        day = c1_rows["day"]
        assert (day["redis"], day["postgres"], day["in_flight"], day["drift"]) == (100, 100, 0, 0)
        # The minute row is (100, 100, 0) or, when the report ran in the next minute, all zero:
        # either way it balances.
        minute = c1_rows["minute"]
        assert (minute["redis"], minute["postgres"], minute["in_flight"]) in ((100, 100, 0), (0, 0, 0))


async def test_reconciliation_endpoint_needs_postgres(client):
    response = await client.get("/v1/admin/reconciliation", headers=ADMIN)
    assert (response.status_code, response.json()["error"]["code"]) == (501, "postgres_required")
