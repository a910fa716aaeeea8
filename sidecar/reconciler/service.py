"""The reconciler: full sync at start and on a timer, the change feed (LISTEN/NOTIFY)
applied as it comes, the streams drained continuously; Postgres or Redis going away
is waited out with backoff, and nothing is lost meanwhile (streams are only trimmed
once Postgres has their entries)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import msgspec

from sidecar.config import Settings
from sidecar.core.webhooks import RetryPolicy
from sidecar.integrations import sync_loop
from sidecar.integrations.connection_store import ConnectionStore
from sidecar.integrations.secret_box import SecretBox
from sidecar.reconciler import gateway_drift, hourly_alerts, monitoring, partitions
from sidecar.reconciler.catalog import PostgresCatalog
from sidecar.reconciler.drain import drain_events, drain_notices, drain_usage
from sidecar.reconciler.ledger import Ledger
from sidecar.reconciler.migrations import pending
from sidecar.reconciler.sync import apply_change, full_sync
from sidecar.reconciler.webhooks import Dispatcher
from sidecar.store.base import StoreUnavailable
from sidecar.store.redis_store import RedisStore

log = logging.getLogger("aforo.reconciler")
CHANNEL = "aforo_changes"
DIRTY_BATCH = 10_000  # dirty streams taken per drain pass
# Failures waited out with backoff: the database or Redis is away for a while.
RECOVERABLE = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, StoreUnavailable, TimeoutError)


class SchemaNotReady(RuntimeError):
    """Migrations are pending: run `aforo-sidecar migrate` first."""


class Change(msgspec.Struct):
    table: str
    tenant: str
    id: str
    origin: str = ""


@contextlib.asynccontextmanager
async def open_pool(settings: Settings, min_size: int = 1, max_size: int = 8) -> AsyncIterator[asyncpg.Pool]:
    assert settings.database_url is not None
    pool = await asyncio.wait_for(
        asyncpg.create_pool(settings.database_url, min_size=min_size, max_size=max_size, command_timeout=30),
        timeout=10,
    )
    try:
        yield pool
    finally:
        await pool.close()


class Backoff:
    def __init__(self, first: float = 0.2, cap: float = 5.0) -> None:
        self.first, self.cap, self.delay = first, cap, first

    async def wait(self, stop: asyncio.Event) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=self.delay)
        self.delay = min(self.cap, self.delay * 2)

    def reset(self) -> None:
        self.delay = self.first


def webhook_dispatcher(settings: Settings, pool: asyncpg.Pool, box: SecretBox | None) -> Dispatcher:
    policy = RetryPolicy(
        first_s=settings.webhook_retry_first_seconds,
        max_s=settings.webhook_retry_max_seconds,
        period_s=settings.webhook_retry_hours * 3600,
    )
    return Dispatcher(
        pool,
        box,
        policy,
        timeout_s=settings.webhook_timeout_seconds,
        concurrency=settings.webhook_concurrency,
    )


class Reconciler:
    def __init__(self, settings: Settings, store: RedisStore) -> None:
        self.settings = settings
        self.store = store
        self.synced = asyncio.Event()  # set after each successful full sync (for tests)

    async def run_once(self) -> dict[str, int]:
        """One full sync and a complete drain (cron-style use, tests)."""
        async with open_pool(self.settings) as pool:
            ledger = await self._ledger(pool)
            counts = await full_sync(ledger, self.store)
            counts["usage"] = await drain_usage(ledger, self.store, self.settings.drain_batch)
            counts["events"] = await drain_events(ledger, self.store, self.settings.drain_batch)
            counts["notices"] = await drain_notices(ledger, self.store, self.settings.drain_batch)
            return counts

    async def run(self, stop: asyncio.Event) -> None:
        """Until ``stop`` is set: sessions, each ended by a recoverable failure."""
        backoff = Backoff()
        while not stop.is_set():
            try:
                await self._session(stop, backoff)
            except* RECOVERABLE as group:
                monitoring.INTERRUPTIONS.inc()
                log.warning(
                    "reconciler interrupted (%s); retrying in %.1fs", group.exceptions[0], backoff.delay
                )
                await backoff.wait(stop)

    async def _ledger(self, pool: asyncpg.Pool) -> Ledger:
        async with pool.acquire() as conn:
            missing = await pending(conn)
        if missing:
            raise SchemaNotReady(f"migrations not applied: {', '.join(missing)}; run `aforo-sidecar migrate`")
        return Ledger(pool)

    async def _session(self, stop: asyncio.Event, backoff: Backoff) -> None:
        async with open_pool(self.settings) as pool:
            ledger = await self._ledger(pool)
            changes: asyncio.Queue[Change] = asyncio.Queue()
            listener = await asyncpg.connect(self.settings.database_url)
            catalog = PostgresCatalog(self.settings, self.store)
            box = SecretBox(self.settings.secret_keys) if self.settings.secret_keys else None
            connections = ConnectionStore(pool, box)
            dispatcher = webhook_dispatcher(self.settings, pool, box)
            try:
                # Listen before the full sync: a change made during it is applied after.
                await listener.add_listener(CHANNEL, lambda *args: self._notified(changes, args[3]))
                await full_sync(ledger, self.store)
                self.synced.set()
                backoff.reset()
                async with asyncio.TaskGroup() as tasks:
                    tasks.create_task(self._apply_changes(ledger, changes, stop))
                    tasks.create_task(self._drain(ledger, stop))
                    tasks.create_task(self._resync(ledger, listener, stop))
                    tasks.create_task(partitions.maintain(pool, self.settings, stop))  # ahead, retention
                    # Imports write through the admin write path, as the API does.
                    tasks.create_task(sync_loop.run(connections, ledger, catalog, stop))
                    tasks.create_task(dispatcher.run(stop, self.settings.webhook_poll_ms / 1000))
                    tasks.create_task(hourly_alerts.run_forever(pool, stop))
                    delay = timedelta(hours=self.settings.gateway_drift_delay_hours)
                    tasks.create_task(
                        gateway_drift.run_forever(pool, self.settings.drift_threshold_pct, delay, stop)
                    )
            finally:
                await dispatcher.close()
                await catalog.close()
                with contextlib.suppress(Exception):
                    await listener.close(timeout=2)

    @staticmethod
    def _notified(changes: asyncio.Queue[Change], payload: str) -> None:
        try:
            changes.put_nowait(msgspec.json.decode(payload, type=Change))
        except msgspec.DecodeError:
            log.warning("ignoring malformed change notification %r", payload)

    async def _apply_changes(
        self, ledger: Ledger, changes: asyncio.Queue[Change], stop: asyncio.Event
    ) -> None:
        while not stop.is_set():
            try:
                change = await asyncio.wait_for(changes.get(), timeout=0.5)
            except TimeoutError:
                continue
            if change.origin == "settlement":
                continue  # our own wallet writes: Redis already has them
            await apply_change(ledger, self.store, change.table, change.tenant, change.id)

    async def _drain(self, ledger: Ledger, stop: asyncio.Event) -> None:
        """Drain the streams sidecars marked dirty; scan for every stream at the start
        and every stream_scan_interval_seconds, so a mark lost with a crashed sidecar
        or reconciler only delays a stream, never loses it."""
        interval = self.settings.drain_interval_ms / 1000
        batch = self.settings.drain_batch
        last_scan = float("-inf")
        while not stop.is_set():
            await self.store.beat()  # the health endpoints read it
            if time.monotonic() - last_scan >= self.settings.stream_scan_interval_seconds:
                last_scan = time.monotonic()
                usage = await drain_usage(ledger, self.store, batch)
                events = await drain_events(ledger, self.store, batch)
                notices = await drain_notices(ledger, self.store, batch)
            else:
                popped = await self.store.take_dirty(DIRTY_BATCH)
                try:
                    usage = await drain_usage(
                        ledger, self.store, batch, [(t, c) for k, t, c in popped if k == "u"]
                    )
                    events = await drain_events(
                        ledger, self.store, batch, [(t, c) for k, t, c in popped if k == "g"]
                    )
                    notices = await drain_notices(
                        ledger, self.store, batch, [(t, c) for k, t, c in popped if k == "n"]
                    )
                except BaseException:
                    with contextlib.suppress(*RECOVERABLE):
                        await self.store.return_dirty(popped)
                    raise
            # The backlog left after the pass (one SCARD): what the dashboards and alerts watch.
            _, waiting = await self.store.health()
            monitoring.drained(usage, events, notices, waiting)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)

    async def _resync(self, ledger: Ledger, listener: asyncpg.Connection, stop: asyncio.Event) -> None:
        """A full sync on the slow timer; and end the session if the change feed's
        connection is gone (the next session resyncs, so no change is missed)."""
        last = time.monotonic()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.5)
            if listener.is_closed():
                raise OSError("the change feed connection was lost")
            if time.monotonic() - last >= self.settings.full_sync_interval_seconds:
                await full_sync(ledger, self.store)
                last = time.monotonic()
