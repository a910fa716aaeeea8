"""The monthly partitions of the usage ledger and the gateway events (migration 0011):
created ahead, and dropped past the retention limit.

The reconciler runs ``maintain`` beside its drains: at start and every hour it makes
sure the current month and the next ``AHEAD_MONTHS`` have their partitions (so rows
never land in the default partition in normal operation) and, with
``usage_retention_months`` set, drops every monthly partition whose whole month ended
more than that many months ago. The rollups (migration 0010) are not touched: the
summary of a dropped month still answers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime

import asyncpg

from sidecar.config import Settings

log = logging.getLogger("aforo.reconciler")
TABLES = ("usage_records", "gateway_events")
AHEAD_MONTHS = 2
CHECK_EVERY_S = 3600.0
RETRY_S = 60.0  # after a partition change waited too long for its lock
LOCK_TIMEOUT = "5s"  # creating or dropping a partition waits this long for queries on it


def month_start(at: datetime, months_later: int = 0) -> datetime:
    """The start of the UTC month ``months_later`` months after the one holding ``at``."""
    at = at.astimezone(UTC)
    index = at.year * 12 + at.month - 1 + months_later
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


async def ensure(conn: asyncpg.Connection, now: datetime, ahead: int = AHEAD_MONTHS) -> list[str]:
    """Create the partitions of the month holding ``now`` and the ``ahead`` next ones that
    are missing (each taking the default partition's rows of its month); their names."""
    created = []
    for table in TABLES:
        for later in range(ahead + 1):
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
                name = await conn.fetchval(
                    "SELECT aforo_ensure_partition($1, $2)", table, month_start(now, later)
                )
            if name is not None:
                created.append(name)
    return created


def retention_cutoff(now: datetime, months: int) -> datetime:
    """Partitions whose month ended at or before this are dropped: ``months`` months
    before ``now`` (the same day of the month, or its last day)."""
    now = now.astimezone(UTC)
    first = month_start(now, -months)
    day = now.day
    while True:
        try:
            return now.replace(year=first.year, month=first.month, day=day)
        except ValueError:  # no 31st in that month
            day -= 1


async def apply_retention(conn: asyncpg.Connection, months: int, now: datetime) -> list[str]:
    """Drop the raw partitions entirely older than ``months`` months (0: keep forever)
    and the default partition's rows before the cutoff; the names dropped."""
    if months <= 0:
        return []
    cutoff = retention_cutoff(now, months)
    dropped = []
    for table in TABLES:
        async with conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
            dropped += [r[0] for r in await conn.fetch("SELECT aforo_drop_partitions($1, $2)", table, cutoff)]
    return dropped


async def maintain_once(pool: asyncpg.Pool, retention_months: int, now: datetime | None = None) -> list[str]:
    """One pass: partitions ahead, then retention. What it created and dropped."""
    now = now or datetime.now(UTC)
    async with pool.acquire() as conn:
        created = await ensure(conn, now)
        dropped = await apply_retention(conn, retention_months, now)
    if created:
        log.info("created partitions %s", ", ".join(created))
    if dropped:
        log.info("retention (%d months) dropped %s", retention_months, ", ".join(dropped))
    return created + dropped


async def maintain(pool: asyncpg.Pool, settings: Settings, stop: asyncio.Event) -> None:
    """``maintain_once`` at start and every CHECK_EVERY_S until ``stop``; a pass that
    waited too long for a lock is tried again after RETRY_S (other failures end the
    reconciler's session, as its other tasks' do)."""
    while not stop.is_set():
        wait = CHECK_EVERY_S
        try:
            await maintain_once(pool, settings.usage_retention_months)
        except asyncpg.LockNotAvailableError as exc:
            log.warning("partition maintenance waited too long for a lock (%s); retrying", exc)
            wait = RETRY_S
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=wait)
