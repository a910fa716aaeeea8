"""Usage spikes and gateway error rates (issue 19's alerts over whole hours), from the
hourly rollups the settlement keeps: each fires once per consumer, product and hour,
however many reconcilers evaluate the hour at once, and only above its rule."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import msgspec
import pytest

from sidecar.core.alerts import AlertRules, error_rate_alert, spike_alert
from sidecar.core.models import UsageEvent, UsageRecord
from sidecar.reconciler import hourly_alerts
from sidecar.reconciler.alerts import put_rules
from sidecar.reconciler.ledger import Ledger

HOUR = datetime(2026, 11, 20, 15, tzinfo=UTC)  # a Friday afternoon


def test_a_spike_is_above_the_share_of_the_mean_hour_compared_in_integers() -> None:
    rules = AlertRules(usage_spike_pct=200, usage_spike_min_calls=20)
    assert spike_alert("t", "c", "p", 0, 21, 1_680, rules) is not None  # 210% of 10/h
    assert spike_alert("t", "c", "p", 0, 20, 1_680, rules) is None  # 200% exactly: not above
    assert spike_alert("t", "c", "p", 0, 19, 840, rules) is None  # below the minimum calls
    assert spike_alert("t", "c", "p", 0, 500, 0, rules) is None  # no history: no spike
    assert spike_alert("t", "c", "p", 0, 500, 1, AlertRules(usage_spike_pct=None)) is None
    assert error_rate_alert("t", "c", "p", 0, 100, 6, rules) is not None
    assert error_rate_alert("t", "c", "p", 0, 100, 5, rules) is None  # 5% exactly: not above
    assert error_rate_alert("t", "c", "p", 0, 19, 19, rules) is None  # below the minimum calls


@pytest.fixture
async def ledger(migrated_database: str) -> AsyncIterator[Ledger]:
    pool = await asyncpg.create_pool(migrated_database, min_size=1, max_size=6)
    await pool.execute("INSERT INTO tenants (id) VALUES ('default')")
    try:
        yield Ledger(pool)
    finally:
        await pool.close()


def _records(consumer_id: str, start: datetime, hours: int, per_hour: int, tag: str) -> list[UsageRecord]:
    return [
        UsageRecord(
            request_id=f"{tag}-{h}-{i}",
            decision_id=f"{tag}-{h}-{i}",
            ts_ms=int((start + timedelta(hours=h, seconds=i)).timestamp() * 1000),
            tenant="default",
            consumer_id=consumer_id,
            product="search",
            operation="",
            cost=0,
            hits=1,
        )
        for h in range(hours)
        for i in range(per_hour)
    ]


async def _settle(ledger: Ledger, records: list[UsageRecord]) -> None:
    """Through the settlement, in batches from 4 tasks at once (as drains would)."""
    batches = [records[i : i + 500] for i in range(0, len(records), 500)]

    async def worker(n: int) -> None:
        for k in range(n, len(batches), 4):
            batch = batches[k]
            await ledger.settle_usage("default", batch[0].consumer_id, batch, f"usage:{batch[0].request_id}")

    await asyncio.gather(*(worker(n) for n in range(4)))


def _events(consumer_id: str, calls: int, errors: int) -> list[UsageEvent]:
    start = int((HOUR + timedelta(minutes=5)).timestamp() * 1000)
    return [
        UsageEvent(
            consumer_id=consumer_id,
            request_id=f"{consumer_id}-e{i}",
            product="search",
            status=503 if i < errors else 200,
            started_at_ms=start + i,
        )
        for i in range(calls)
    ]


async def test_spikes_and_error_rates_fire_once_per_hour_above_their_rules(ledger: Ledger) -> None:
    async with ledger.pool.acquire() as conn:
        await put_rules(conn, AlertRules(usage_spike_min_calls=20))
    week = HOUR - timedelta(days=7)
    # A week of 10 calls an hour for both; then 21 in the hour (210%) and 19 (190%).
    await _settle(ledger, _records("spiking", week, 168, 10, "w") + _records("steady", week, 168, 10, "w"))
    await _settle(ledger, _records("spiking", HOUR, 1, 21, "h") + _records("steady", HOUR, 1, 19, "h"))
    # The gateway's hour: 6 errors in 100 (6%) and 5 in 100 (5%, not above).
    for consumer_id, errors in (("spiking", 6), ("steady", 5)):
        events = _events(consumer_id, 100, errors)
        received = [e.started_at_ms for e in events]
        assert await ledger.record_events(events, received) == 100

    # Three reconcilers evaluate the hour at once: each alert once.
    fired = await asyncio.gather(*(hourly_alerts.evaluate(ledger.pool, HOUR) for _ in range(3)))
    assert sum(fired) == 2
    rows = await ledger.pool.fetch("SELECT consumer_id, type, key, data FROM alerts ORDER BY type")
    hour_ms = int(HOUR.timestamp() * 1000)
    assert [(r["consumer_id"], r["type"], r["key"]) for r in rows] == [
        ("spiking", "gateway.error_rate", f"search:{hour_ms}"),
        ("spiking", "usage.spike", f"search:{hour_ms}"),
    ]
    error = msgspec.json.decode(rows[0]["data"])
    assert (error["calls"], error["errors"], error["error_rate_pct"]) == (100, 6, 6.0)
    spike = msgspec.json.decode(rows[1]["data"])
    assert (spike["calls"], spike["baseline_per_hour"], spike["pct"]) == (21, 10.0, 210.0)
    assert await hourly_alerts.evaluate(ledger.pool, HOUR) == 0  # evaluated again: nothing new
    # The hour before: steady usage, no errors reported: nothing.
    assert await hourly_alerts.evaluate(ledger.pool, HOUR - timedelta(hours=1)) == 0

    # Rules off: nothing fires for the next hour's spike.
    async with ledger.pool.acquire() as conn:
        await put_rules(conn, AlertRules(usage_spike_pct=None, error_rate_pct=None))
    await _settle(ledger, _records("spiking", HOUR + timedelta(hours=1), 1, 500, "n"))
    assert await hourly_alerts.evaluate(ledger.pool, HOUR + timedelta(hours=1)) == 0


def test_the_last_complete_hours() -> None:
    now = datetime(2026, 12, 7, 0, 4, 30, tzinfo=UTC)
    assert hourly_alerts.last_hours(now) == [
        datetime(2026, 12, 6, 22, tzinfo=UTC),
        datetime(2026, 12, 6, 23, tzinfo=UTC),
    ]
