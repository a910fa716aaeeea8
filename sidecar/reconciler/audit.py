"""Verify the audit log's hash chain."""

from __future__ import annotations

import hashlib

import asyncpg
import msgspec


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
