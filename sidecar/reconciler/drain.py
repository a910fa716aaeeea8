"""Drain the usage and event streams of Redis into Postgres, then settle wallets.

Order of a usage batch, and why a crash anywhere loses and doubles nothing:
1. read the oldest entries of a consumer's stream (nothing is removed by reading);
2. one Postgres transaction: insert the rows (duplicates skipped by the primary key)
   and debit the wallet by the cost of the rows that were new;
3. one Lua step in Redis: take the wallet's new balance and settled total (guarded by
   its version) and trim the stream below the batch's last id.
A crash before 2 commits leaves the stream as it was; after 2 and before 3 the next
pass re-reads the batch, inserts nothing, debits nothing, and completes step 3.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

from sidecar.core.models import UsageEvent
from sidecar.reconciler.ledger import Ledger
from sidecar.reconciler.sync import apply_wallet
from sidecar.store.redis_store import RedisStore, next_stream_id

log = logging.getLogger("aforo.reconciler")
T = TypeVar("T")


async def drain_usage(
    ledger: Ledger, store: RedisStore, batch: int = 1000, streams: Iterable[tuple[str, str]] | None = None
) -> int:
    """Drain the usage streams of ``streams`` (tenant, consumer), every one found by a
    scan when None, until empty; returns the number of new ledger rows."""
    total = 0
    for tenant, consumer_id in await store.scan_streams("u") if streams is None else streams:
        while True:
            entries = await store.read_usage(tenant, consumer_id, batch)
            if not entries:
                break
            first, last = entries[0][0], entries[-1][0]
            wallet, new = await ledger.settle_usage(
                tenant, consumer_id, [record for _, record in entries], f"usage:{first}:{last}"
            )
            if wallet is None:
                log.warning(
                    "usage of %s:%s, a consumer Postgres never had: %d records kept in the "
                    "ledger, charged to no wallet",
                    tenant,
                    consumer_id,
                    len(entries),
                )
                await store.trim_usage(tenant, consumer_id, next_stream_id(last))
            else:
                await apply_wallet(store, wallet, trim_before=next_stream_id(last))
            total += new
            if len(entries) < batch:
                break
    if total:
        log.info("drained %d usage records", total)
    return total


async def _copy_out(
    streams: Iterable[tuple[str, str]],
    read: Callable[[str, str, int], Awaitable[list[T]]],
    record: Callable[[str, str, list[T]], Awaitable[int]],
    trim: Callable[[str, str, str], Awaitable[None]],
    entry_id: Callable[[T], str],
    batch: int,
) -> int:
    """Copy each consumer's stream into Postgres a batch at a time, then trim what
    Postgres holds: ``record`` is idempotent (by key), so a crash between the two copies
    nothing twice. Returns the number of new rows."""
    total = 0
    for tenant, consumer_id in streams:
        while True:
            entries = await read(tenant, consumer_id, batch)
            if not entries:
                break
            total += await record(tenant, consumer_id, entries)
            await trim(tenant, consumer_id, next_stream_id(entry_id(entries[-1])))
            if len(entries) < batch:
                break
    return total


async def drain_events(
    ledger: Ledger, store: RedisStore, batch: int = 1000, streams: Iterable[tuple[str, str]] | None = None
) -> int:
    """Drain the gateway event streams of ``streams`` (all when None); returns the
    number of new event rows."""

    async def record(tenant: str, consumer_id: str, entries: list[tuple[str, UsageEvent]]) -> int:
        # The entry id's milliseconds: when Redis received it, the same on a re-drain.
        return await ledger.record_events(
            [event for _, event in entries], [int(entry_id.split("-", 1)[0]) for entry_id, _ in entries]
        )

    total = await _copy_out(
        await store.scan_streams("g") if streams is None else streams,
        store.read_events,
        record,
        store.trim_events,
        lambda entry: entry[0],
        batch,
    )
    if total:
        log.info("drained %d gateway events", total)
    return total


async def drain_notices(
    ledger: Ledger, store: RedisStore, batch: int = 1000, streams: Iterable[tuple[str, str]] | None = None
) -> int:
    """Drain the wallet notices streams of ``streams`` (all when None) into
    wallet_notices; returns the number of new rows."""
    total = await _copy_out(
        await store.scan_streams("n") if streams is None else streams,
        store.read_notices,
        ledger.record_notices,
        store.trim_notices,
        lambda notice: notice.id,
        batch,
    )
    if total:
        log.info("drained %d wallet notices", total)
    return total
