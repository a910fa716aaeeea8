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
from collections.abc import Iterable

from sidecar.reconciler.ledger import Ledger
from sidecar.reconciler.sync import apply_wallet
from sidecar.store.redis_store import RedisStore, next_stream_id

log = logging.getLogger("aforo.reconciler")


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


async def drain_events(
    ledger: Ledger, store: RedisStore, batch: int = 1000, streams: Iterable[tuple[str, str]] | None = None
) -> int:
    """Drain the gateway event streams of ``streams`` (all when None); returns the
    number of new event rows."""
    total = 0
    for tenant, consumer_id in await store.scan_streams("g") if streams is None else streams:
        while True:
            entries = await store.read_events(tenant, consumer_id, batch)
            if not entries:
                break
            total += await ledger.record_events([event for _, event in entries])
            await store.trim_events(tenant, consumer_id, next_stream_id(entries[-1][0]))
            if len(entries) < batch:
                break
    if total:
        log.info("drained %d gateway events", total)
    return total


async def drain_notices(
    ledger: Ledger, store: RedisStore, batch: int = 1000, streams: Iterable[tuple[str, str]] | None = None
) -> int:
    """Drain the wallet notices streams of ``streams`` (all when None) into
    wallet_notices; returns the number of new rows. Recorded by id, then trimmed: a
    crash in between records nothing twice."""
    total = 0
    for tenant, consumer_id in await store.scan_streams("n") if streams is None else streams:
        while True:
            entries = await store.read_notices(tenant, consumer_id, batch)
            if not entries:
                break
            total += await ledger.record_notices(tenant, consumer_id, entries)
            await store.trim_notices(tenant, consumer_id, next_stream_id(entries[-1].id))
            if len(entries) < batch:
                break
    if total:
        log.info("drained %d wallet notices", total)
    return total
