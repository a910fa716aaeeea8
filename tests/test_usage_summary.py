"""Usage query and export, and growth under control (issue 19): the summary of
GET /v1/usage/summary read from the rollups equals a direct count over the ledger (JSON
and CSV) for data settled through the real settlement path by concurrent tasks, a batch
settled again changes nothing, bad parameters are refused with their code, retention
drops an old partition while its rollups still answer, and the months ahead get their
partitions. Real Postgres (a database per test) and Redis."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest

from sidecar.core.models import UsageEvent, UsageRecord
from sidecar.reconciler import partitions, rollups
from sidecar.reconciler.ledger import Ledger
from sidecar.server import build_app
from sidecar.store.redis_store import RedisStore
from tests.conftest import ADMIN, make_settings, seed
from tests.test_access import bearer, mint

pytestmark = pytest.mark.slow

SUMMARY = "/v1/usage/summary"
WEEK = datetime(2026, 11, 2, tzinfo=UTC)  # a Monday
PRODUCTS = ("search", "maps", "geo")
PRICES = {"search": 7, "maps": 25, "geo": 3}
KNOWN = ("app-1", "app-2", "app-3", "app-4")  # app-1, app-2 on plan gold; the others on silver


class Env:
    def __init__(self, http: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
        self.http = http
        self.pool = pool
        self.ledger = Ledger(pool)

    async def summary(self, **params: str) -> dict:
        response = await self.http.get(SUMMARY, params=params, headers=ADMIN)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json"
        return response.json()

    async def summary_csv(self, **params: str) -> list[dict[str, str]]:
        response = await self.http.get(SUMMARY, params=params, headers={**ADMIN, "Accept": "text/csv"})
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/csv")
        return list(csv.DictReader(io.StringIO(response.text)))


@contextlib.asynccontextmanager
async def env(database_url: str, redis_url: str, prefix: str) -> AsyncIterator[Env]:
    settings = make_settings(
        redis_url=redis_url, key_prefix=prefix, database_url=database_url, grpc_port=0, decision_port=0
    )
    store = RedisStore(redis_url, prefix=prefix)
    app = build_app(settings, store)
    pool = await asyncpg.create_pool(database_url, min_size=0, max_size=10)
    try:
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sidecar") as http,
        ):
            yield Env(http, pool)
    finally:
        await pool.close()
        await store.close()


def records(consumer_id: str, count: int, start: datetime, span: timedelta, seed_: int) -> list[UsageRecord]:
    rng = random.Random(seed_)
    out = []
    for i in range(count):
        at = start + timedelta(seconds=rng.randrange(int(span.total_seconds())))
        product = rng.choice(PRODUCTS)
        hits = rng.choice((1, 1, 1, 2, 5))
        out.append(
            UsageRecord(
                request_id=f"{consumer_id}-r{seed_}-{i}",
                decision_id=f"{consumer_id}-d{seed_}-{i}",
                ts_ms=int(at.timestamp() * 1000),
                tenant="default",
                consumer_id=consumer_id,
                product=product,
                operation="GET /",
                cost=PRICES[product] * hits,
                hits=hits,
            )
        )
    return out


async def settle_concurrently(ledger: Ledger, batches: list[tuple[str, list[UsageRecord]]]) -> int:
    """Settle the batches from 8 tasks at once (one consumer's batches race each other)."""
    queue = list(batches)
    new = 0

    async def worker() -> None:
        nonlocal new
        while queue:
            consumer_id, batch = queue.pop()
            _, added = await ledger.settle_usage(
                "default", consumer_id, batch, f"test:{batch[0].decision_id}"
            )
            new += added

    await asyncio.gather(*(worker() for _ in range(8)))
    return new


async def seed_catalog(http: httpx.AsyncClient) -> None:
    for consumer_id in KNOWN:
        plan = "gold" if consumer_id in ("app-1", "app-2") else "silver"
        await seed(http, plan_id=plan, consumer_id=consumer_id, wallet_mode="postpaid")


def week_batches() -> list[tuple[str, list[UsageRecord]]]:
    """A week of usage of five consumers (one Postgres never had), 50 rows a batch, with
    rows just before and after the week."""
    batches = []
    for n, consumer_id in enumerate((*KNOWN, "ghost")):
        rows = records(consumer_id, 1_200, WEEK, timedelta(days=7), n)
        rows += records(consumer_id, 40, WEEK - timedelta(hours=5), timedelta(hours=5), 100 + n)
        rows += records(consumer_id, 40, WEEK + timedelta(days=7), timedelta(hours=5), 200 + n)
        batches += [(consumer_id, rows[i : i + 50]) for i in range(0, len(rows), 50)]
    return batches


async def direct(pool: asyncpg.Pool, unit: str, key: str, start: datetime, end: datetime, tz: str = "UTC"):
    rows = await pool.fetch(
        f"""SELECT date_trunc('{unit}', ts, $3) AS bucket, {key} AS key, sum(hits)::bigint AS calls,
                   sum(cost)::bigint AS charged
            FROM usage_records u LEFT JOIN consumers c ON c.tenant = u.tenant AND c.id = u.consumer_id
            WHERE u.tenant = 'default' AND ts >= $1 AND ts < $2 GROUP BY 1, 2 ORDER BY 1, 2""",
        start,
        end,
        tz,
    )
    return [(r["bucket"], r["key"], r["calls"], r["charged"]) for r in rows]


def answered(body: dict, key: str) -> list[tuple[datetime, str, int, int]]:
    return [(datetime.fromisoformat(b["bucket"]), b[key], b["calls"], b["charged"]) for b in body["buckets"]]


async def test_the_week_by_day_and_product_equals_a_direct_count_over_the_ledger(
    migrated_database: str, redis_url: str, prefix: str
) -> None:
    async with env(migrated_database, redis_url, prefix) as e:
        await seed_catalog(e.http)
        batches = week_batches()
        assert await settle_concurrently(e.ledger, batches) == sum(len(b) for _, b in batches)
        end = WEEK + timedelta(days=7)
        expected = await direct(e.pool, "day", "product", WEEK, end)
        assert len(expected) == 7 * len(PRODUCTS)
        params = {"from": "2026-11-02", "to": "2026-11-09", "granularity": "day", "group_by": "product"}
        body = await e.summary(**params)
        assert (body["source"], body["granularity"], body["group_by"]) == ("daily", "day", ["product"])
        assert answered(body, "product") == expected
        assert all(
            b["bytes"] == 0 and set(b) == {"bucket", "product", "calls", "charged", "bytes"}
            for b in body["buckets"]
        )
        # The same as CSV, parsed.
        table = await e.summary_csv(**params)
        assert list(table[0]) == ["bucket", "product", "calls", "charged", "bytes"]
        assert [
            (datetime.fromisoformat(r["bucket"]), r["product"], int(r["calls"]), int(r["charged"]))
            for r in table
        ] == expected
        # From the hourly rollups (a range that is not whole days): the same sums.
        hourly = await e.summary(**{**params, "from": "2026-11-02T05:00:00Z", "to": "2026-11-08T19:00:00Z"})
        assert hourly["source"] == "hourly"
        assert answered(hourly, "product") == await direct(
            e.pool, "day", "product", WEEK + timedelta(hours=5), WEEK + timedelta(days=6, hours=19)
        )
        # By consumer and plan (a consumer Postgres never had: plan ''), and one consumer's.
        by_plan = await e.summary(**{**params, "group_by": "plan", "granularity": "week"})
        assert answered(by_plan, "plan_id") == await direct(
            e.pool, "week", "coalesce(c.plan_id, '')", WEEK, end
        )
        assert {b["plan_id"] for b in by_plan["buckets"]} == {"", "gold", "silver"}
        one = await e.summary(**{**params, "consumer_id": "app-3"})
        rows = await e.pool.fetch(
            """SELECT date_trunc('day', ts, 'UTC') AS b, product, sum(hits)::bigint AS calls,
                      sum(cost)::bigint AS charged FROM usage_records
               WHERE consumer_id = 'app-3' AND ts >= $1 AND ts < $2 GROUP BY 1, 2 ORDER BY 1, 2""",
            WEEK,
            end,
        )
        assert answered(one, "product") == [tuple(r) for r in rows]


async def test_calendar_buckets_in_a_time_zone_and_iso_weeks(
    migrated_database: str, redis_url: str, prefix: str
) -> None:
    async with env(migrated_database, redis_url, prefix) as e:
        await seed_catalog(e.http)
        await settle_concurrently(e.ledger, week_batches())
        # Days in Madrid (UTC+1 in November) come from the hourly rollups re-bucketed.
        body = await e.summary(
            **{"from": "2026-11-02", "to": "2026-11-09", "tz": "Europe/Madrid", "group_by": "product"}
        )
        assert body["source"] == "hourly" and body["from"] == "2026-11-02T00:00:00+01:00"
        madrid = datetime(2026, 11, 1, 23, tzinfo=UTC)
        assert answered(body, "product") == await direct(
            e.pool, "day", "product", madrid, madrid + timedelta(days=7), "Europe/Madrid"
        )
        assert body["buckets"][0]["bucket"] == "2026-11-02T00:00:00+01:00"
        # Weeks start on Monday (ISO); a range from a Wednesday starts with a partial week,
        # labelled by its Monday (the rows of Sunday 1 November before the test week).
        weeks = await e.summary(**{"from": "2026-10-28", "to": "2026-11-16", "granularity": "week"})
        assert [b["bucket"] for b in weeks["buckets"]] == [
            "2026-10-26T00:00:00+00:00",
            "2026-11-02T00:00:00+00:00",
            "2026-11-09T00:00:00+00:00",
        ]
        assert [b["calls"] for b in weeks["buckets"]] == [
            r[2]
            for r in await direct(e.pool, "week", "''", WEEK - timedelta(days=7), WEEK + timedelta(days=14))
        ]
        total = await e.pool.fetchval("SELECT sum(hits) FROM usage_records")
        assert sum(b["calls"] for b in weeks["buckets"]) == total
        months = await e.summary(**{"from": "2026-10-01", "to": "2027-01-01", "granularity": "month"})
        assert [(b["bucket"], b["calls"]) for b in months["buckets"]] == [
            ("2026-11-01T00:00:00+00:00", total)
        ]


async def test_a_batch_settled_again_changes_nothing(
    migrated_database: str, redis_url: str, prefix: str
) -> None:
    async with env(migrated_database, redis_url, prefix) as e:
        await seed_catalog(e.http)
        batches = week_batches()[:40]
        await settle_concurrently(e.ledger, batches)
        snapshot = {
            table: await e.pool.fetch(f"SELECT * FROM {table} ORDER BY 1, 2, 3, 4, 5, 6")
            for table in rollups.TABLES.values()
        }
        balances = await e.pool.fetch("SELECT consumer_id, balance FROM wallets ORDER BY 1")
        params = {"from": "2026-11-01", "to": "2026-11-10", "group_by": "consumer,product"}
        before = await e.summary(**params)
        # A drain that crashed after the commit reads the same batches again.
        assert await settle_concurrently(e.ledger, batches) == 0
        for table, rows in snapshot.items():
            assert await e.pool.fetch(f"SELECT * FROM {table} ORDER BY 1, 2, 3, 4, 5, 6") == rows
        assert await e.pool.fetch("SELECT consumer_id, balance FROM wallets ORDER BY 1") == balances
        assert await e.summary(**params) == before
        # Gateway events: by status class, with their bytes, each event once.
        events = [
            UsageEvent(consumer_id="app-1", request_id=f"g{i}", product="search", status=status,
                       started_at_ms=int((WEEK + timedelta(hours=1)).timestamp() * 1000),
                       request_size=100, response_size=1_000)
            for i, status in enumerate((200, 200, 201, 404, 503))
        ]  # fmt: skip
        aggregate = UsageEvent(consumer_id="app-1", request_id="ag", product="search", count=40, errors=4,
                               started_at_ms=int(WEEK.timestamp() * 1000), response_size=9_000)  # fmt: skip
        received = [int(WEEK.timestamp() * 1000) + i for i in range(7)]
        # events[0] twice in one batch (the same stream entry): once; the batch drained again: nothing.
        assert (
            await e.ledger.record_events([*events, aggregate, events[0]], [*received[:6], received[0]]) == 6
        )
        assert await e.ledger.record_events([*events, aggregate], received[:6]) == 0
        status = await e.summary(
            **{"from": "2026-11-02", "to": "2026-11-03", "group_by": "status", "consumer_id": "app-1"}
        )
        by_status = {b["status"]: (b["calls"], b["bytes"]) for b in status["buckets"]}
        allowed = await e.pool.fetchval(
            "SELECT sum(hits) FROM usage_records WHERE consumer_id = 'app-1' AND ts >= $1 AND ts < $2",
            WEEK,
            WEEK + timedelta(days=1),
        )
        assert by_status == {
            "allowed": (allowed, 0),
            "2xx": (3, 3_300),
            "4xx": (1, 1_100),
            "5xx": (1, 1_100),
            "ok": (36, 9_000),
            "error": (4, 0),
        }
        # Without status: the calls are the allowed decisions, the bytes the gateways'.
        plain = await e.summary(**{"from": "2026-11-02", "to": "2026-11-03", "consumer_id": "app-1"})
        assert [(b["calls"], b["bytes"]) for b in plain["buckets"]] == [(allowed, 14_500)]


@pytest.mark.parametrize(
    ("params", "code", "field"),
    [
        ({"to": "2026-11-09"}, "invalid_range", "from"),
        ({"from": "2026-11-09", "to": "2026-11-02"}, "invalid_range", "from"),
        ({"from": "2026-11-02", "to": "2026-11-02"}, "invalid_range", "from"),
        ({"from": "yesterday", "to": "2026-11-02"}, "invalid_time", "from"),
        ({"from": "2026-11-02", "to": "2026-11-09T10:30:00Z"}, "invalid_range", "to"),
        ({"from": "2026-01-01", "to": "2026-03-01", "granularity": "hour"}, "invalid_range", "to"),
        ({"from": "2020-01-01", "to": "2026-01-01", "granularity": "month"}, "invalid_range", "to"),
        (
            {"from": "2026-11-02", "to": "2026-11-09", "granularity": "year"},
            "invalid_granularity",
            "granularity",
        ),
        (
            {"from": "2026-11-02", "to": "2026-11-09", "group_by": "product,colour"},
            "unknown_group_by",
            "group_by",
        ),
        ({"from": "2026-11-02", "to": "2026-11-09", "tz": "Mars/Olympus"}, "invalid_time_zone", "tz"),
        ({"from": "2026-11-02", "to": "2026-11-09", "tz": "Asia/Kolkata"}, "unsupported_time_zone", "tz"),
        (
            {"from": "2026-11-02", "to": "2026-11-09", "consumer_id": "a b"},
            "invalid_identifier",
            "consumer_id",
        ),
        ({"from": "1969-12-01", "to": "1970-01-02"}, "invalid_time", "from"),
    ],
)
async def test_bad_parameters_are_refused_with_their_code(
    migrated_database: str, redis_url: str, prefix: str, params: dict, code: str, field: str
) -> None:
    async with env(migrated_database, redis_url, prefix) as e:
        response = await e.http.get(SUMMARY, params=params, headers=ADMIN)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == code
        assert response.json()["error"]["field"] == field


async def test_who_may_read_the_summary_and_without_postgres(
    migrated_database: str, redis_url: str, prefix: str
) -> None:
    async with env(migrated_database, redis_url, prefix) as e:
        await seed_catalog(e.http)
        await settle_concurrently(e.ledger, week_batches()[:60])
        params = {"from": "2026-11-02", "to": "2026-11-09", "granularity": "week"}
        developer = bearer(await mint(e.http, "developer", consumers=["app-1"]))
        mine = await e.http.get(SUMMARY, params=params, headers=developer)
        assert mine.status_code == 200, mine.text
        own = await e.pool.fetchval(
            "SELECT sum(hits) FROM usage_records WHERE consumer_id = 'app-1' AND ts >= $1 AND ts < $2",
            WEEK,
            WEEK + timedelta(days=7),
        )
        assert [b["calls"] for b in mine.json()["buckets"]] == [own]
        theirs = await e.http.get(SUMMARY, params={**params, "consumer_id": "app-2"}, headers=developer)
        assert (theirs.status_code, theirs.json()["error"]["code"]) == (404, "consumer_not_found")
        viewer = bearer(await mint(e.http, "viewer"))
        assert (await e.http.get(SUMMARY, params=params, headers=viewer)).status_code == 200
        other = await e.http.get(SUMMARY, params={**params, "tenant": "acme"}, headers=viewer)
        assert (other.status_code, other.json()["error"]["code"]) == (404, "tenant_not_found")
        gateway = bearer(await mint(e.http, "gateway"))
        assert (await e.http.get(SUMMARY, params=params, headers=gateway)).status_code == 403
    app = build_app(make_settings())  # the embedded store, no Postgres
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sidecar") as http:
        response = await http.get(SUMMARY, params=params, headers=ADMIN)
        assert (response.status_code, response.json()["error"]["code"]) == (501, "postgres_required")


async def test_retention_drops_an_old_partition_and_its_rollups_still_answer(
    migrated_database: str, redis_url: str, prefix: str
) -> None:
    now = datetime.now(UTC)
    old = partitions.month_start(now, -14)  # a month well past a 12-month limit
    older = partitions.month_start(now, -15)  # no partition: its rows wait in the default one
    async with env(migrated_database, redis_url, prefix) as e:
        await seed_catalog(e.http)
        await settle_concurrently(
            e.ledger,
            [("app-1", records("app-1", 300, old, timedelta(days=20), 1)),
             ("app-2", records("app-2", 5, older, timedelta(days=20), 2))],
        )  # fmt: skip
        assert await e.pool.fetchval("SELECT count(*) FROM usage_records_default") == 305
        async with e.pool.acquire() as conn:
            # Creating the old month's partition takes its rows out of the default one.
            assert await partitions.ensure(conn, old, ahead=0) == [
                f"usage_records_p{old:%Y%m}",
                f"gateway_events_p{old:%Y%m}",
            ]
        assert await e.pool.fetchval("SELECT count(*) FROM usage_records_default") == 5
        assert await e.pool.fetchval(f"SELECT count(*) FROM usage_records_p{old:%Y%m}") == 300
        start, end = old.date().isoformat(), partitions.month_start(old, 1).date().isoformat()
        params = {"from": start, "to": end, "group_by": "product"}
        expected = await direct(e.pool, "day", "product", old, partitions.month_start(old, 1))
        before = await e.summary(**params)
        assert answered(before, "product") == expected
        # Kept forever by default; 12 months: the old month's partition and the older
        # rows in the default partition go; the current month's stays.
        assert await partitions.maintain_once(e.pool, 0) == []
        dropped = await partitions.maintain_once(e.pool, 12)
        assert f"usage_records_p{old:%Y%m}" in dropped and "usage_records_default" in dropped
        assert await e.pool.fetchval("SELECT to_regclass($1)", f"usage_records_p{old:%Y%m}") is None
        assert await e.pool.fetchval("SELECT to_regclass($1)", f"usage_records_p{now:%Y%m}") is not None
        assert (
            await e.pool.fetchval(
                "SELECT count(*) FROM usage_records WHERE ts < $1", now - timedelta(days=365)
            )
            == 0
        )
        # The rollups stay: the summary of those days is what it was, hourly ones too.
        assert await e.summary(**params) == before
        hourly = await e.summary(**{**params, "from": f"{start}T01:00:00Z"})
        assert sum(b["calls"] for b in hourly["buckets"]) == sum(r[2] for r in expected) - sum(
            r.hits
            for r in records("app-1", 300, old, timedelta(days=20), 1)
            if r.ts_ms < (old.timestamp() + 3600) * 1000
        )
        # ...and cannot be rebuilt from raw rows that are gone.
        async with e.pool.acquire() as conn:
            with pytest.raises(asyncpg.RaiseError, match="dropped by retention"):
                await rollups.rebuild(conn, old, partitions.month_start(old, 1))


async def test_partitions_are_made_for_the_months_ahead(migrated_database: str) -> None:
    pool = await asyncpg.create_pool(migrated_database, min_size=0, max_size=2)
    try:
        # The migration made the current month and the next two.
        now = datetime.now(UTC)
        for later in range(3):
            month = partitions.month_start(now, later)
            for table in partitions.TABLES:
                assert await pool.fetchval("SELECT to_regclass($1)", f"{table}_p{month:%Y%m}") is not None
        at = datetime(2031, 12, 17, 10, tzinfo=UTC)
        assert await partitions.maintain_once(pool, 0, at) == [
            f"{table}_p{month}" for table in partitions.TABLES for month in ("203112", "203201", "203202")
        ]
        assert await partitions.maintain_once(pool, 0, at) == []  # nothing twice
        bounds = await pool.fetchval(
            "SELECT pg_get_expr(relpartbound, oid) FROM pg_class WHERE relname = 'usage_records_p203201'"
        )
        assert bounds == "FOR VALUES FROM ('2032-01-01 00:00:00+00') TO ('2032-02-01 00:00:00+00')"
    finally:
        await pool.close()


def test_the_retention_cutoff_is_whole_months_back() -> None:
    assert partitions.retention_cutoff(datetime(2027, 3, 31, 12, tzinfo=UTC), 1) == datetime(
        2027, 2, 28, 12, tzinfo=UTC
    )
    assert partitions.retention_cutoff(datetime(2027, 1, 15, tzinfo=UTC), 14) == datetime(
        2025, 11, 15, tzinfo=UTC
    )
    assert partitions.month_start(datetime(2027, 1, 15, tzinfo=UTC), -13) == datetime(2025, 12, 1, tzinfo=UTC)
