"""The alerts of a whole hour, from the hourly rollups: usage spikes and gateway error
rates (sidecar/core/alerts.py). The reconciler evaluates the last two complete hours
every few minutes (the second catches what the gateway reported late); each alert's key
is its consumer, product and hour, so an hour evaluated again, or by several
reconcilers at once, fires nothing twice."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime, timedelta

import asyncpg

from sidecar.core.alerts import BASELINE_HOURS, NewAlert, error_rate_alert, spike_alert
from sidecar.reconciler.alerts import record_alerts, rules_of

log = logging.getLogger("aforo.reconciler")
# Gateway outcomes of the rollups (migration 0010) that are errors, and that are calls.
ERROR_OUTCOMES = ("5xx", "error")
GATEWAY_OUTCOMES = ("1xx", "2xx", "3xx", "4xx", "5xx", "ok", "error")

_SPIKES = """
WITH hour AS (
    SELECT consumer_id, product, sum(calls)::bigint AS calls FROM usage_rollup_hourly
    WHERE tenant = $1 AND bucket = $2 AND outcome = 'allowed' GROUP BY 1, 2
), week AS (
    SELECT consumer_id, product, sum(calls)::bigint AS calls FROM usage_rollup_hourly
    WHERE tenant = $1 AND bucket >= $3 AND bucket < $2 AND outcome = 'allowed'
        AND (consumer_id, product) IN (SELECT consumer_id, product FROM hour)
    GROUP BY 1, 2
)
SELECT consumer_id, product, hour.calls, coalesce(week.calls, 0) AS week_calls
FROM hour LEFT JOIN week USING (consumer_id, product)
"""

_ERRORS = """
SELECT consumer_id, product, sum(calls)::bigint AS calls,
    sum(calls) FILTER (WHERE outcome = ANY ($3::text[]))::bigint AS errors
FROM usage_rollup_hourly
WHERE tenant = $1 AND bucket = $2 AND outcome = ANY ($4::text[])
GROUP BY 1, 2
"""


async def evaluate(pool: asyncpg.Pool, hour: datetime) -> int:
    """The alerts of ``hour`` (its start, UTC) for every tenant; returns how many were new."""
    hour_ms = int(hour.timestamp() * 1000)
    total = 0
    for row in await pool.fetch("SELECT id FROM tenants"):
        tenant = row["id"]
        async with pool.acquire() as conn, conn.transaction():
            rules = (await rules_of(conn, {tenant}))[tenant]
            alerts: list[NewAlert | None] = []
            if rules.usage_spike_pct is not None:
                week_start = hour - timedelta(hours=BASELINE_HOURS)
                for r in await conn.fetch(_SPIKES, tenant, hour, week_start):
                    alerts.append(
                        spike_alert(
                            tenant,
                            r["consumer_id"],
                            r["product"],
                            hour_ms,
                            r["calls"],
                            r["week_calls"],
                            rules,
                        )
                    )
            if rules.error_rate_pct is not None:
                for r in await conn.fetch(
                    _ERRORS, tenant, hour, list(ERROR_OUTCOMES), list(GATEWAY_OUTCOMES)
                ):
                    alerts.append(
                        error_rate_alert(
                            tenant,
                            r["consumer_id"],
                            r["product"],
                            hour_ms,
                            r["calls"],
                            r["errors"] or 0,
                            rules,
                        )
                    )
            total += await record_alerts(conn, [a for a in alerts if a is not None])
    return total


def last_hours(now: datetime, count: int = 2) -> list[datetime]:
    """The starts of the last ``count`` complete UTC hours, oldest first."""
    current = now.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    return [current - timedelta(hours=n) for n in range(count, 0, -1)]


async def run_forever(pool: asyncpg.Pool, stop: asyncio.Event, every_s: float = 300) -> None:
    while not stop.is_set():
        for hour in last_hours(datetime.now(UTC)):
            fired = await evaluate(pool, hour)
            if fired:
                log.info("%d hourly alerts for %s", fired, hour.isoformat())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=every_s)
