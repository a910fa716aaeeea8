"""Usage rollups: hourly and daily per tenant, consumer, product, plan and outcome
(migration 0010 says what each outcome is), with calls, charged micros and bytes.

The reconciler adds to them in the transaction that records the ledger rows or the
gateway events, only the rows that were new in it (``add_usage``, ``add_events``), so a
batch drained again after a crash adds nothing twice. ``rebuild`` recomputes whole UTC
days from the raw tables (the migration that made the rollups used it for the rows an
existing database held; the benchmark uses it after a bulk load). ``summary`` is the
query behind ``GET /v1/usage/summary``."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import asyncpg

from sidecar.core.usage_summary import SummaryQuery

TABLES = {"hour": "usage_rollup_hourly", "day": "usage_rollup_daily"}
_COLUMNS = "tenant, bucket, consumer_id, product, plan_id, outcome, calls, charged, bytes"
_KEY = "tenant, bucket, consumer_id, product, plan_id, outcome"


def _add(rows: str) -> str:
    """One statement adding the relation ``rows`` (columns: tenant, at, consumer_id,
    product, plan_id, outcome, calls, charged, bytes) to both rollups: its hourly sums
    to the hourly ones, and their daily sums to the daily ones. Keys in a fixed order,
    so two transactions adding to the same keys wait for each other, never deadlock."""

    def upsert(table: str, select: str) -> str:
        return f"""INSERT INTO {table} AS r ({_COLUMNS}) {select}
            ON CONFLICT ({_KEY}) DO UPDATE SET calls = r.calls + EXCLUDED.calls,
                charged = r.charged + EXCLUDED.charged, bytes = r.bytes + EXCLUDED.bytes"""

    hourly = upsert(TABLES["hour"], "SELECT * FROM hours ORDER BY 1, 2, 3, 4, 5, 6")
    daily = upsert(
        TABLES["day"],
        """SELECT tenant, date_trunc('day', bucket, 'UTC'), consumer_id, product, plan_id, outcome,
                  sum(calls), sum(charged), sum(bytes)
           FROM hours GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY 1, 2, 3, 4, 5, 6""",
    )
    return f"""WITH hours AS MATERIALIZED (
            SELECT tenant, date_trunc('hour', at, 'UTC') AS bucket, consumer_id, product, plan_id, outcome,
                   sum(calls)::bigint AS calls, sum(charged)::bigint AS charged, sum(bytes)::bigint AS bytes
            FROM {rows} GROUP BY 1, 2, 3, 4, 5, 6),
        hourly AS ({hourly})
        {daily}"""


_ADD_USAGE = _add(
    """(SELECT $1::text AS tenant, u.at, $2::text AS consumer_id, u.product,
        coalesce((SELECT plan_id FROM consumers WHERE tenant = $1 AND id = $2), '') AS plan_id,
        'allowed' AS outcome, u.hits AS calls, u.cost AS charged, 0::bigint AS bytes
    FROM unnest($3::timestamptz[], $4::text[], $5::bigint[], $6::bigint[])
        AS u(at, product, cost, hits)) rows"""
)
_ADD_EVENTS = _add(
    """(SELECT e.tenant, e.at, e.consumer_id, e.product, coalesce(c.plan_id, '') AS plan_id,
        o.outcome, o.calls, 0::bigint AS charged, o.bytes
    FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::bigint[], $6::bigint[], $7::bigint[],
                $8::timestamptz[]) AS e(tenant, consumer_id, product, status, n, errors, size, at)
    LEFT JOIN consumers c ON c.tenant = e.tenant AND c.id = e.consumer_id
    CROSS JOIN LATERAL aforo_event_outcomes(e.status, e.n, e.errors, e.size) o) rows"""
)


async def add_usage(
    conn: asyncpg.Connection, tenant: str, consumer_id: str, new: Sequence[asyncpg.Record]
) -> None:
    """Add one consumer's new ledger rows (``ts, product, cost, hits`` of each) to the
    rollups, in the caller's transaction. Plan: the consumer's now ('' if unknown)."""
    if not new:
        return
    args = (
        tenant,
        consumer_id,
        [r["ts"] for r in new],
        [r["product"] for r in new],
        [r["cost"] for r in new],
        [r["hits"] for r in new],
    )
    await conn.execute(_ADD_USAGE, *args)


async def add_events(conn: asyncpg.Connection, new: Sequence[asyncpg.Record]) -> None:
    """Add new gateway events (``tenant, consumer_id, product, status, count, errors,
    bytes, at`` of each; ``at``: started_at, else recorded_at) to the rollups, in the
    caller's transaction."""
    if not new:
        return
    args = [
        [r[name] for r in new]
        for name in ("tenant", "consumer_id", "product", "status", "count", "errors", "bytes", "at")
    ]
    await conn.execute(_ADD_EVENTS, *args)


async def rebuild(conn: asyncpg.Connection, start: datetime, end: datetime) -> int:
    """Recompute the rollups of [start, end), whole UTC days, from the raw tables
    (refused for days retention has dropped); returns the hourly rows written."""
    async with conn.transaction():
        return await conn.fetchval("SELECT aforo_rollup_rebuild($1, $2)", start, end)


def summary(query: SummaryQuery, developer_consumers: Sequence[str] | None) -> tuple[str, list[object]]:
    """The SQL of a usage summary and its arguments. Daily rollups when the buckets are
    UTC days or longer and the range is whole UTC days; hourly ones otherwise (re-bucketed
    in the query's zone). Without ``status`` in group_by, calls are the allowed
    decisions (the ledger's) and bytes the gateways'; with it, each outcome's own."""
    args: list[object] = []

    def arg(value: object) -> str:
        args.append(value)
        return f"${len(args)}"

    daily = query.uses_daily()
    where = [f"tenant = {arg(query.tenant)}", f"bucket >= {arg(query.start)}", f"bucket < {arg(query.end)}"]
    if query.consumer_id is not None:
        where.append(f"consumer_id = {arg(query.consumer_id)}")
    if developer_consumers is not None:
        where.append(f"consumer_id = ANY({arg(list(developer_consumers))}::text[])")
    if query.product is not None:
        where.append(f"product = {arg(query.product)}")
    if daily and query.granularity == "day":
        bucket = "bucket"
    else:
        bucket = f"date_trunc('{query.granularity}', bucket, {arg(query.time_zone)})"
    keys = query.group_columns()
    if "status" in query.group_by:
        calls = "sum(calls)"
    else:
        calls = "coalesce(sum(calls) FILTER (WHERE outcome = 'allowed'), 0)"
    select = ", ".join([f"{bucket} AS bucket", *keys])
    group = ", ".join(str(i) for i in range(1, len(keys) + 2))
    sql = f"""SELECT {select}, {calls}::bigint AS calls, sum(charged)::bigint AS charged,
                     sum(bytes)::bigint AS bytes
              FROM {TABLES["day" if daily else "hour"]} WHERE {" AND ".join(where)}
              GROUP BY {group} ORDER BY {group}"""
    return sql, args
