#!/usr/bin/env python3
"""Usage summary at scale: 10 million ledger rows, how fast they go in, and how fast
the day-by-product summary of one tenant answers from the rollups.

    python loadtests/usage_summary_bench.py [--rows 10000000] [--tenants 4] [--months 3]

In a scratch database (migrated like production, removed afterwards unless --keep):
1. a sample through the real settlement path (Ledger.settle_usage: ledger rows, rollups
   and wallet debits in one transaction; 8 concurrent tasks, batches of 1,000), with
   and without the rollups, so their cost shows;
2. the bulk load: --rows ledger rows over --months months for --tenants tenants
   (generate_series in SQL, into the monthly partitions), then the rollups of those
   days built by aforo_rollup_rebuild (sidecar/reconciler/rollups.py ``rebuild``, the
   function the migration builds an existing database's rollups with);
3. GET /v1/usage/summary (granularity=day, group_by=product) for one tenant over a week
   and over a month, through the real app in process (--runs times each: median, p95),
   the same from the hourly rollups (tz=Europe/Madrid), and, for comparison, a direct
   GROUP BY over the ledger for the month.

Needs Postgres (AFORO_TEST_DATABASE_URL, a role that may create databases) and Redis
(AFORO_REDIS_URL; the app needs one, nothing is written to it). Not a test: it prints
figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from unittest import mock

import asyncpg
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sidecar.core.models import UsageRecord
from sidecar.reconciler import partitions, rollups
from sidecar.reconciler.ledger import Ledger
from sidecar.reconciler.migrations import migrate
from sidecar.server import build_app
from sidecar.store.redis_store import RedisStore
from tests.conftest import ADMIN, make_settings

REDIS_URL = os.environ.get("AFORO_REDIS_URL", "redis://127.0.0.1:6379/0")
PG_URL = os.environ.get("AFORO_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
CHUNK = 1_000_000  # rows per bulk INSERT


def database_in(url: str, name: str) -> str:
    return url.rsplit("/", 1)[0] + "/" + name


async def catalog(conn: asyncpg.Connection, tenants: int, consumers: int) -> None:
    for t in range(tenants):
        await conn.execute("INSERT INTO tenants (id) VALUES ($1)", f"t{t}")
        for plan in ("gold", "silver"):
            await conn.execute("INSERT INTO plans (tenant, id, price) VALUES ($1, $2, 10)", f"t{t}", plan)
        await conn.executemany(
            "INSERT INTO consumers (tenant, id, plan_id, wallet_mode) VALUES ($1, $2, $3, 'postpaid')",
            [(f"t{t}", f"app-{c}", "gold" if c % 2 else "silver") for c in range(consumers)],
        )


async def settle_sample(pool: asyncpg.Pool, rows: int, consumers: int, products: int, tag: str) -> float:
    """Rows per second through Ledger.settle_usage (8 tasks, batches of 1,000)."""
    ledger = Ledger(pool)
    now_ms = int(time.time() * 1000)
    batches = []
    for b in range(rows // 1000):
        consumer_id = f"app-{b % consumers}"
        batches.append(
            (
                consumer_id,
                [
                    UsageRecord(
                        request_id=f"{tag}-{b}-{i}",
                        decision_id=f"{tag}-{b}-{i}",
                        ts_ms=now_ms - i * 1000,
                        tenant="t0",
                        consumer_id=consumer_id,
                        product=f"product-{i % products}",
                        operation="",
                        cost=10,
                        hits=1,
                    )
                    for i in range(1000)
                ],
            )
        )

    async def worker() -> None:
        while batches:
            consumer_id, batch = batches.pop()
            await ledger.settle_usage("t0", consumer_id, batch, f"{tag}:{batch[0].decision_id}")

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(8)))
    return rows / (time.perf_counter() - started)


async def bulk_load(
    conn: asyncpg.Connection,
    rows: int,
    tenants: int,
    consumers: int,
    products: int,
    start: datetime,
    end: datetime,
) -> float:
    """Rows per second of generate_series INSERTs into the partitioned ledger."""
    span = (end - start).total_seconds()
    started = time.perf_counter()
    for first in range(0, rows, CHUNK):
        last = min(rows, first + CHUNK) - 1
        await conn.execute(
            """INSERT INTO usage_records
                   (tenant, consumer_id, request_id, decision_id, ts, product, operation, cost, hits)
               SELECT 't' || (g % $3), 'app-' || ((g / $3) % $4), 'b' || g, 'b' || g,
                      $6::timestamptz + make_interval(secs => floor(random() * $7::float8)),
                      'product-' || ((g * 7919) % $5),
                      '', 10 * (1 + (g * 7919) % $5), 1
               FROM generate_series($1::bigint, $2::bigint) g""",
            first,
            last,
            tenants,
            consumers,
            products,
            start,
            span,
        )
        print(
            f"  loaded {last + 1:,} rows ({(last + 1) / (time.perf_counter() - started):,.0f}/s)", flush=True
        )
    return rows / (time.perf_counter() - started)


async def timed(http: httpx.AsyncClient, params: dict[str, str], runs: int) -> tuple[float, float, int]:
    """(median ms, p95 ms, buckets) of GET /v1/usage/summary."""
    times = []
    count = 0
    for _ in range(runs):
        started = time.perf_counter()
        response = await http.get("/v1/usage/summary", params=params, headers=ADMIN)
        times.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200, response.text
        count = len(response.json()["buckets"])
    times.sort()
    return statistics.median(times), times[max(0, int(len(times) * 0.95) - 1)], count


async def run(args: argparse.Namespace) -> None:
    name = f"aforo_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(PG_URL)
    await admin.execute(f"CREATE DATABASE {name}")
    url = database_in(PG_URL, name)
    print(f"scratch database {name}")
    try:
        pool = await asyncpg.create_pool(url, min_size=1, max_size=10, command_timeout=3600)
        now = datetime.now(UTC)
        end = partitions.month_start(now)  # the bulk rows fill the months before this one
        start = partitions.month_start(now, -args.months)
        async with pool.acquire() as conn:
            await migrate(conn)
            await catalog(conn, args.tenants, args.consumers)
            for m in range(-args.months, 1):
                await partitions.ensure(conn, partitions.month_start(now, m), ahead=0)

        # 1. the settlement path: with and without the rollups, alternated (best of 2 each)
        async def no_rollups(*_: object) -> None:
            return None

        with_rollups = without = 0.0
        for round_ in range(2):
            rate = await settle_sample(pool, args.sample, args.consumers, args.products, f"w{round_}")
            with_rollups = max(with_rollups, rate)
            with mock.patch.object(rollups, "add_usage", no_rollups):
                rate = await settle_sample(pool, args.sample, args.consumers, args.products, f"n{round_}")
                without = max(without, rate)
        print(
            f"settle path ({args.sample:,} rows, 8 tasks, batches of 1,000): {with_rollups:,.0f} rows/s "
            f"with rollups, {without:,.0f} rows/s without"
        )

        # 2. the bulk load and its rollups
        async with pool.acquire() as conn:
            print(f"bulk load of {args.rows:,} rows, {start:%Y-%m-%d} to {end:%Y-%m-%d}:")
            rate = await bulk_load(conn, args.rows, args.tenants, args.consumers, args.products, start, end)
            print(f"bulk load: {rate:,.0f} rows/s")
            began = time.perf_counter()
            hourly = await rollups.rebuild(conn, start, end)
            took = time.perf_counter() - began
            print(
                f"rollups rebuilt in {took:.1f} s ({args.rows / took:,.0f} ledger rows/s;"
                f" {hourly:,} hourly rows)"
            )
            await conn.execute("ANALYZE")
            total = await conn.fetchval("SELECT count(*) FROM usage_records")
            daily = await conn.fetchval("SELECT count(*) FROM usage_rollup_daily")
            size = await conn.fetchval("SELECT pg_size_pretty(pg_database_size(current_database()))")
            print(f"usage_records: {total:,} rows; usage_rollup_daily: {daily:,} rows; database {size}")

        # 3. the summary, through the app
        settings = make_settings(
            redis_url=REDIS_URL, database_url=url, grpc_port=0, decision_port=0, key_prefix=f"bench:{name}:"
        )
        store = RedisStore(REDIS_URL, prefix=settings.key_prefix)
        app = build_app(settings, store)
        week_start = partitions.month_start(end, -1) + timedelta(days=7)
        month_start = partitions.month_start(end, -1)
        cases = {
            "week, daily rollups": {
                "from": f"{week_start:%Y-%m-%d}",
                "to": f"{week_start + timedelta(days=7):%Y-%m-%d}",
            },
            "month, daily rollups": {"from": f"{month_start:%Y-%m-%d}", "to": f"{end:%Y-%m-%d}"},
            "week, hourly (Europe/Madrid)": {
                "from": f"{week_start:%Y-%m-%d}",
                "to": f"{week_start + timedelta(days=7):%Y-%m-%d}",
                "tz": "Europe/Madrid",
            },
            "month, hourly (Europe/Madrid)": {
                "from": f"{month_start:%Y-%m-%d}",
                "to": f"{end:%Y-%m-%d}",
                "tz": "Europe/Madrid",
            },
        }
        try:
            async with (
                app.router.lifespan_context(app),
                httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sidecar") as http,
            ):
                for label, params in cases.items():
                    query = {"tenant": "t1", "granularity": "day", "group_by": "product", **params}
                    await timed(http, query, 3)  # warm
                    median, p95, buckets = await timed(http, query, args.runs)
                    print(
                        f"summary, one tenant, day by product, {label}: median {median:.1f} ms,"
                        f" p95 {p95:.1f} ms ({buckets} buckets, {args.runs} runs)"
                    )
        finally:
            await store.close()
        async with pool.acquire() as conn:
            times = []
            for _ in range(3):
                began = time.perf_counter()
                await conn.fetch(
                    """SELECT date_trunc('day', ts, 'UTC'), product, sum(hits), sum(cost) FROM usage_records
                       WHERE tenant = 't1' AND ts >= $1 AND ts < $2 GROUP BY 1, 2""",
                    month_start,
                    end,
                )
                times.append((time.perf_counter() - began) * 1000)
            print(
                "for comparison, GROUP BY over the ledger, the month:"
                f" median {statistics.median(times):.0f} ms"
            )
        await pool.close()
    finally:
        if not args.keep:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--consumers", type=int, default=50, help="per tenant")
    parser.add_argument("--products", type=int, default=5)
    parser.add_argument("--months", type=int, default=3)
    parser.add_argument("--sample", type=int, default=100_000, help="rows through the settlement path")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
