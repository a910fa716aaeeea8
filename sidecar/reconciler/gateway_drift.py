"""Drift against the gateway (sidecar/core/drift.py): the comparison, read-only for the
API, and runs that store their rows and raise gateway.drift alerts in one transaction.
The reconciler runs it daily for the previous UTC day, once per tenant and day."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime, timedelta

import asyncpg
import msgspec

from sidecar.core.drift import DENIAL_STATUSES, DriftRow, drift_alert, drift_pct, is_flagged
from sidecar.reconciler.alerts import record_alerts, rules_of

log = logging.getLogger("aforo.reconciler")
SCHEDULE = "schedule"
# A gateway event is received after it started: events received this long before the
# range cannot belong to it, so older partitions of gateway_events are skipped.
CLOCK_SKEW = timedelta(hours=1)

COMPARE_SQL = f"""
WITH allowed AS (
    SELECT consumer_id, product, date_trunc('hour', ts, 'UTC') AS hour, sum(hits)::bigint AS n
    FROM usage_records
    WHERE tenant = $1 AND ts >= $2 AND ts < $3 AND decision_id NOT LIKE 'ev:%'
    GROUP BY 1, 2, 3
), gateway AS (
    SELECT consumer_id, product, date_trunc('hour', coalesce(started_at, recorded_at), 'UTC') AS hour,
        sum(CASE
            WHEN status BETWEEN 100 AND 599 THEN
                CASE WHEN decision_id <> '' OR status NOT IN {DENIAL_STATUSES} THEN count ELSE 0 END
            ELSE greatest(count - errors, 0)
        END)::bigint AS n
    FROM gateway_events
    WHERE tenant = $1 AND received_at >= $4
        AND coalesce(started_at, recorded_at) >= $2 AND coalesce(started_at, recorded_at) < $3
    GROUP BY 1, 2, 3
), reporting AS (
    -- Only consumers the gateway reports on in the range: without its counts there is
    -- nothing to compare (a gateway that sends none is not drift).
    SELECT DISTINCT consumer_id FROM gateway
)
SELECT consumer_id, product, hour, coalesce(a.n, 0) AS allowed, coalesce(g.n, 0) AS gateway
FROM allowed a FULL JOIN gateway g USING (consumer_id, product, hour)
WHERE consumer_id IN (SELECT consumer_id FROM reporting)
ORDER BY consumer_id, product, hour
"""


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def compare_args(tenant: str, start: datetime, end: datetime) -> list[object]:
    """COMPARE_SQL's arguments."""
    return [tenant, start, end, start - CLOCK_SKEW]


def drift_row(tenant: str, r: asyncpg.Record, threshold_pct: float) -> DriftRow:
    """A row of COMPARE_SQL."""
    return DriftRow(
        tenant=tenant,
        consumer_id=r["consumer_id"],
        product=r["product"],
        hour=iso(r["hour"]),
        hour_ms=int(r["hour"].timestamp() * 1000),
        allowed=r["allowed"],
        gateway=r["gateway"],
        drift=r["gateway"] - r["allowed"],
        drift_pct=drift_pct(r["allowed"], r["gateway"]),
        flagged=is_flagged(r["allowed"], r["gateway"], threshold_pct),
    )


async def compare(
    conn: asyncpg.Connection, tenant: str, start: datetime, end: datetime, threshold_pct: float
) -> list[DriftRow]:
    rows = await conn.fetch(COMPARE_SQL, *compare_args(tenant, start, end))
    return [drift_row(tenant, r, threshold_pct) for r in rows]


async def threshold_of(conn: asyncpg.Connection, tenant: str, default_pct: float) -> float:
    rules = (await rules_of(conn, {tenant}))[tenant]
    return default_pct if rules.drift_threshold_pct is None else rules.drift_threshold_pct


class DriftRun(msgspec.Struct):
    id: str
    tenant: str
    start: str
    end: str
    threshold_pct: float
    compared: int
    flagged: int
    alerts: int  # new gateway.drift alerts (an hour already alerted on is not again)
    flagged_rows: list[DriftRow]  # every row is stored with the run (gateway_drift_rows)


async def run(
    pool: asyncpg.Pool, tenant: str, start: datetime, end: datetime, default_pct: float, requested_by: str
) -> DriftRun:
    """Compare, store the run and its rows, and raise an alert per flagged hour."""
    async with pool.acquire() as conn, conn.transaction():
        threshold = await threshold_of(conn, tenant, default_pct)
        rows = await compare(conn, tenant, start, end, threshold)
        flagged = [r for r in rows if r.flagged]
        run_id = await conn.fetchval(
            """INSERT INTO gateway_drift_runs
                   (tenant, range_start, range_end, threshold_pct, requested_by, rows_compared, rows_flagged)
               VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id""",
            tenant,
            start,
            end,
            threshold,
            requested_by,
            len(rows),
            len(flagged),
        )
        await conn.executemany(
            """INSERT INTO gateway_drift_rows
                   (run_id, consumer_id, product, hour, allowed, gateway, drift_pct, flagged)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8)""",
            [
                (
                    run_id,
                    r.consumer_id,
                    r.product,
                    datetime.fromtimestamp(r.hour_ms / 1000, UTC),
                    r.allowed,
                    r.gateway,
                    r.drift_pct,
                    r.flagged,
                )
                for r in rows
            ],
        )
        alerts = await record_alerts(conn, [drift_alert(r, threshold) for r in flagged])
    return DriftRun(
        str(run_id), tenant, iso(start), iso(end), threshold, len(rows), len(flagged), alerts, flagged
    )


async def run_daily(pool: asyncpg.Pool, default_pct: float, now: datetime, delay: timedelta) -> int:
    """The run of the last UTC day that ended at least ``delay`` ago (the gateway's data
    arrives late), for every tenant that has none yet; returns how many ran."""
    day_end = (now - delay).astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    day_start = day_end - timedelta(days=1)
    tenants = await pool.fetch(
        """SELECT id FROM tenants t WHERE NOT EXISTS (
               SELECT 1 FROM gateway_drift_runs r WHERE r.tenant = t.id AND r.requested_by = $3
               AND r.range_start = $1 AND r.range_end = $2)""",
        day_start,
        day_end,
        SCHEDULE,
    )
    for row in tenants:
        result = await run(pool, row["id"], day_start, day_end, default_pct, SCHEDULE)
        if result.flagged:
            log.warning(
                "gateway drift on %s, %s: %d of %d hours above %.2f%%",
                row["id"],
                day_start.date(),
                result.flagged,
                result.compared,
                result.threshold_pct,
            )
    return len(tenants)


async def run_forever(
    pool: asyncpg.Pool, default_pct: float, delay: timedelta, stop: asyncio.Event, every_s: float = 600
) -> None:
    """The daily runs: looked for at start and every ``every_s`` (a day's run is made once)."""
    while not stop.is_set():
        await run_daily(pool, default_pct, datetime.now(UTC), delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=every_s)
