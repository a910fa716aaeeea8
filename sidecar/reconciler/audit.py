"""The audit log: rows written by the admin API itself, and the check of its hash chain."""

from __future__ import annotations

import hashlib

import asyncpg
import msgspec


async def append(
    conn: asyncpg.Connection,
    actor: str,
    action: str,
    tenant: str,
    target: str,
    before: str | None,
    after: str | None,
) -> None:
    """One audit row (JSON ``before`` / ``after``) for a change no trigger audits; the
    insert trigger chains its hash."""
    await conn.execute(
        """INSERT INTO audit_log (actor, action, tenant, target, before, after, prev_hash, hash)
           VALUES ($1, $2, $3, $4, $5::jsonb, $6::jsonb, '', '')""",
        actor,
        action,
        tenant,
        target,
        before,
        after,
    )


class AuditBreak(msgspec.Struct):
    id: int
    problem: str


async def verify(conn: asyncpg.Connection) -> tuple[int, list[AuditBreak]]:
    """Recompute every row's hash in order; returns (rows checked, breaks found).

    An edited row fails its own hash; a deleted or inserted row breaks the link to the
    previous hash. The canonical text is built by the same SQL function the insert
    trigger uses, so the check does not depend on session settings."""
    breaks: list[AuditBreak] = []
    previous = "genesis"
    checked = 0
    async with conn.transaction():
        async for row in conn.cursor(
            "SELECT id, prev_hash, hash, aforo_audit_text(a) AS text FROM audit_log a ORDER BY id"
        ):
            checked += 1
            if row["prev_hash"] != previous:
                breaks.append(
                    AuditBreak(row["id"], "does not follow the previous row (a row was removed or inserted)")
                )
            expected = hashlib.sha256(row["text"].encode("utf-8")).hexdigest()
            if row["hash"] != expected:
                breaks.append(AuditBreak(row["id"], "content does not match its hash (the row was edited)"))
            previous = row["hash"]
    return checked, breaks
