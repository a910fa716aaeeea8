"""The periodic import of every connection, run by the reconciler: each connection
that has been imported once (a first apply, after its preview) is synced again every
``sync_interval_seconds``, applying whatever the diff is then. A failed walk applies
nothing and is recorded in the connection's ``last_sync``; the next round tries again."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

from sidecar.integrations import catalog_import
from sidecar.integrations.connection_store import ConnectionStore
from sidecar.integrations.gateway_http import GatewayError
from sidecar.reconciler.catalog import PostgresCatalog
from sidecar.reconciler.ledger import Ledger

log = logging.getLogger("aforo.reconciler")
CHECK_EVERY_S = 5.0  # how often due connections are looked for


def _due(last_at: str | None, interval_s: int, now: datetime) -> bool:
    if last_at is None:
        return True
    return (now - datetime.fromisoformat(last_at)).total_seconds() >= interval_s


async def sync_due(store: ConnectionStore, ledger: Ledger, catalog: PostgresCatalog) -> int:
    """One round: sync the connections that are due; returns how many were synced."""
    synced = 0
    now = datetime.now(tz=UTC)
    for view in await store.list():
        if view.type not in catalog_import.GATEWAYS:
            continue
        if not await store.imported(view.tenant, view.id):
            continue  # never applied: the first import waits for an operator's preview
        if not _due(view.last_sync.at if view.last_sync else None, view.sync_interval_seconds, now):
            continue
        try:
            applied = await catalog_import.apply(store, ledger, catalog, view.tenant, view.id, None)
        except GatewayError as exc:
            log.warning("connection %s/%s: sync failed (%s): %s", view.tenant, view.id, exc.code, exc.message)
        except Exception:  # one connection's trouble (a secret that no longer opens) spares the rest
            log.exception("connection %s/%s: sync failed", view.tenant, view.id)
        else:
            if applied.counts:
                log.info("connection %s/%s: synced %s", view.tenant, view.id, applied.counts)
        synced += 1
    return synced


async def run(store: ConnectionStore, ledger: Ledger, catalog: PostgresCatalog, stop: asyncio.Event) -> None:
    while not stop.is_set():
        await sync_due(store, ledger, catalog)
        try:
            await asyncio.wait_for(stop.wait(), timeout=CHECK_EVERY_S)
        except TimeoutError:
            continue
