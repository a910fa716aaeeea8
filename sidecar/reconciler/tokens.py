"""API tokens in Postgres (table api_tokens, migration 0007), with an audit row per
change that names the token but never holds a hash."""

from __future__ import annotations

import asyncpg
import msgspec

from sidecar.core.access import ApiToken, Role, view
from sidecar.reconciler import audit

_COLUMNS = (
    "id, tenant, role, name, consumers, secret_hash, previous_hash, previous_until_ms, "
    "created_ms, created_by, expires_ms, revoked_ms, last_used_ms"
)


def _token(row: asyncpg.Record) -> ApiToken:
    return ApiToken(
        id=row["id"],
        tenant=row["tenant"],
        role=Role(row["role"]),
        name=row["name"],
        secret_hash=row["secret_hash"],
        created_ms=row["created_ms"],
        created_by=row["created_by"],
        consumers=list(row["consumers"]),
        expires_ms=row["expires_ms"],
        revoked_ms=row["revoked_ms"],
        previous_hash=row["previous_hash"],
        previous_until_ms=row["previous_until_ms"],
        last_used_ms=row["last_used_ms"],
    )


def _shown(token: ApiToken | None) -> str | None:
    return None if token is None else msgspec.json.encode(view(token)).decode()


class TokenTable:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def put(self, token: ApiToken, action: str, actor: str) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM api_tokens WHERE id = $1 FOR UPDATE", token.id)
            before = None if row is None else _token(row)
            await conn.execute(
                """INSERT INTO api_tokens (id, tenant, role, name, consumers, secret_hash, previous_hash,
                       previous_until_ms, created_ms, created_by, expires_ms, revoked_ms)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
                   ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, consumers = EXCLUDED.consumers,
                       secret_hash = EXCLUDED.secret_hash, previous_hash = EXCLUDED.previous_hash,
                       previous_until_ms = EXCLUDED.previous_until_ms, expires_ms = EXCLUDED.expires_ms,
                       revoked_ms = EXCLUDED.revoked_ms""",
                token.id,
                token.tenant,
                token.role.value,
                token.name,
                token.consumers,
                token.secret_hash,
                token.previous_hash,
                token.previous_until_ms,
                token.created_ms,
                token.created_by,
                token.expires_ms,
                token.revoked_ms,
            )
            await audit.append(conn, actor, action, token.tenant, token.id, _shown(before), _shown(token))

    async def get(self, token_id: str) -> ApiToken | None:
        row = await self.pool.fetchrow(f"SELECT {_COLUMNS} FROM api_tokens WHERE id = $1", token_id)
        return None if row is None else _token(row)

    async def list(self, tenant: str) -> list[ApiToken]:
        rows = await self.pool.fetch(
            f"SELECT {_COLUMNS} FROM api_tokens WHERE tenant = $1 ORDER BY created_ms, id", tenant
        )
        return [_token(row) for row in rows]

    async def touch(self, token_id: str, used_ms: int) -> None:
        await self.pool.execute(
            "UPDATE api_tokens SET last_used_ms = greatest(coalesce(last_used_ms, 0), $2) WHERE id = $1",
            token_id,
            used_ms,
        )
