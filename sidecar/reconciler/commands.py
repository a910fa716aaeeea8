"""`aforo-sidecar migrate | reconcile | audit verify`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

import asyncpg
import msgspec

from sidecar.config import Settings
from sidecar.reconciler import audit, monitoring
from sidecar.reconciler.ledger import Ledger
from sidecar.reconciler.migrations import MigrationError, migrate
from sidecar.reconciler.report import reconciliation_report, render_table
from sidecar.reconciler.service import RECOVERABLE, Reconciler, SchemaNotReady, open_pool
from sidecar.store.redis_store import RedisStore

log = logging.getLogger("aforo.reconciler")


async def _migrate(settings: Settings) -> int:
    conn = await asyncpg.connect(settings.database_url)
    try:
        applied = await migrate(conn)
    finally:
        await conn.close()
    print(f"applied: {', '.join(applied)}" if applied else "schema is up to date; nothing to apply")
    return 0


async def _verify(settings: Settings) -> int:
    conn = await asyncpg.connect(settings.database_url)
    try:
        checked, breaks = await audit.verify(conn)
    finally:
        await conn.close()
    for problem in breaks:
        print(f"audit row {problem.id}: {problem.problem}")
    print(f"{checked} audit rows checked, {len(breaks)} problems")
    return 1 if breaks else 0


def _store(settings: Settings) -> RedisStore:
    assert settings.redis_url is not None
    return RedisStore(
        settings.redis_target(),
        prefix=settings.key_prefix,
        connect_timeout_s=settings.redis_connect_timeout_ms / 1000,
        socket_timeout_s=10,
        breaker_cooldown_s=settings.breaker_cooldown_ms / 1000,
    )


async def _report(settings: Settings, as_json: bool) -> int:
    store = _store(settings)
    try:
        async with open_pool(settings) as pool:
            report = await reconciliation_report(Ledger(pool), store, settings.drift_threshold_pct)
    finally:
        await store.close()
    print(msgspec.json.encode(report).decode() if as_json else render_table(report))
    return 1 if report.flagged else 0


async def _reconcile(settings: Settings, once: bool) -> int:
    store = _store(settings)
    reconciler = Reconciler(settings, store)
    try:
        if once:
            counts = await reconciler.run_once()
            print(msgspec.json.encode(counts).decode())
            return 0
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        metrics_server = monitoring.serve(settings.host, settings.reconciler_metrics_port)
        log.info("reconciler started")
        try:
            await reconciler.run(stop)
        finally:
            if metrics_server is not None:
                metrics_server.shutdown()
                metrics_server.server_close()
        log.info("reconciler stopped")
        return 0
    finally:
        await store.close()


def run_data_command(args: argparse.Namespace, settings: Settings) -> int:
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    try:
        if args.command == "migrate":
            return asyncio.run(_migrate(settings))
        if args.command == "audit":
            return asyncio.run(_verify(settings))
        if args.report:
            return asyncio.run(_report(settings, args.json))
        return asyncio.run(_reconcile(settings, args.once))
    except (MigrationError, SchemaNotReady, monitoring.MetricsPortBusy) as exc:
        print(f"aforo-sidecar: {exc}", file=sys.stderr)
        return 2
    except RECOVERABLE as exc:
        print(f"aforo-sidecar: cannot reach the database or Redis: {exc}", file=sys.stderr)
        return 3
