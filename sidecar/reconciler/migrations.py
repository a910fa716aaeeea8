"""Plain SQL migrations, applied in file-name order, each once, recorded with a
checksum so an edited migration is refused rather than silently skipped."""

from __future__ import annotations

import hashlib
from importlib import resources

import asyncpg

# Serialises migrators (two `aforo-sidecar migrate` at once, a reconciler starting).
_LOCK = 7261845


class MigrationError(RuntimeError):
    pass


def _migrations() -> list[tuple[str, str]]:
    folder = resources.files("sidecar.reconciler").joinpath("migrations")
    files = sorted(f.name for f in folder.iterdir() if f.name.endswith(".sql"))
    return [(name, folder.joinpath(name).read_text(encoding="utf-8")) for name in files]


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Apply the migrations not applied yet; returns their names (empty: a no-op)."""
    applied_now = []
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   name text PRIMARY KEY,
                   checksum text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {
            r["name"]: r["checksum"] for r in await conn.fetch("SELECT name, checksum FROM schema_migrations")
        }
        for name, sql in _migrations():
            checksum = hashlib.sha256(sql.encode()).hexdigest()
            if name in done:
                if done[name] != checksum:
                    raise MigrationError(
                        f"migration {name} was applied with different content; add a new one"
                    )
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (name, checksum) VALUES ($1, $2)", name, checksum
                )
            applied_now.append(name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK)
    return applied_now


async def pending(conn: asyncpg.Connection) -> list[str]:
    """Migrations not applied yet (the reconciler refuses to run on an old schema)."""
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    done = set()
    if exists:
        done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
    return [name for name, _ in _migrations() if name not in done]
