"""Connections in Postgres: their settings (``connections``), their sealed secrets
(``connection_secrets``), what their imports brought in (``connection_objects``), and
an audit row for every write (settings only: a secret never reaches the audit log)."""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg
import msgspec

from sidecar.integrations.connections import (
    REDACTED,
    SECRET_FIELDS,
    ConnectionSpec,
    ConnectionView,
    SyncResult,
)
from sidecar.integrations.secret_box import SecretBox
from sidecar.reconciler import audit

_spec_decoder = msgspec.json.Decoder(ConnectionSpec)
_secrets_decoder = msgspec.json.Decoder(dict[str, str])
_sync_decoder = msgspec.json.Decoder(SyncResult)


class EncryptionKeyMissing(Exception):
    """A secret was given but no secret key is configured to seal it."""


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat()


def _context(tenant: str, connection_id: str) -> str:
    """The associated data that binds a sealed secret to its connection."""
    return f"connection:{tenant}:{connection_id}"


def _public(spec: ConnectionSpec) -> ConnectionSpec:
    return msgspec.structs.replace(spec, **dict.fromkeys(SECRET_FIELDS))


class ConnectionStore:
    def __init__(self, pool: asyncpg.Pool, box: SecretBox | None) -> None:
        self.pool = pool
        self.box = box

    async def put(self, connection_id: str, spec: ConnectionSpec, actor: str) -> tuple[ConnectionView, bool]:
        """Create or replace a connection. A secret left out keeps its sealed value; an
        empty one removes it; a given one is sealed anew (under the current key)."""
        given = spec.secrets()
        if any(given.values()) and self.box is None:
            raise EncryptionKeyMissing("a secret needs AFORO_SECRET_KEYS to be sealed at rest")
        public = msgspec.json.encode(_public(spec)).decode()
        async with self.pool.acquire() as conn, conn.transaction():
            before = await conn.fetchrow(
                "SELECT spec::text AS spec FROM connections WHERE tenant = $1 AND id = $2 FOR UPDATE",
                spec.tenant,
                connection_id,
            )
            await conn.execute(
                """INSERT INTO connections (tenant, id, type, spec) VALUES ($1, $2, $3, $4::jsonb)
                   ON CONFLICT (tenant, id) DO UPDATE
                   SET type = EXCLUDED.type, spec = EXCLUDED.spec, updated_at = now()""",
                spec.tenant,
                connection_id,
                spec.type,
                public,
            )
            held = await self._secrets(conn, spec.tenant, connection_id)
            secrets = {**held, **given}
            secrets = {name: value for name, value in secrets.items() if value}
            if secrets and (given or (self.box is not None and held)):
                assert self.box is not None
                plain = msgspec.json.encode(secrets).decode()
                sealed = self.box.seal(plain, _context(spec.tenant, connection_id))
                await conn.execute(
                    """INSERT INTO connection_secrets (tenant, id, fields, sealed, key_id)
                       VALUES ($1, $2, $3, $4, $5)
                       ON CONFLICT (tenant, id) DO UPDATE
                       SET fields = EXCLUDED.fields, sealed = EXCLUDED.sealed, key_id = EXCLUDED.key_id""",
                    spec.tenant,
                    connection_id,
                    sorted(secrets),
                    sealed,
                    self.box.key_id(sealed),
                )
            elif not secrets:
                await conn.execute(
                    "DELETE FROM connection_secrets WHERE tenant = $1 AND id = $2", spec.tenant, connection_id
                )
            await audit.append(
                conn, actor, "connections.put", spec.tenant, connection_id, before and before["spec"], public
            )
        view = await self.get(spec.tenant, connection_id)
        assert view is not None
        return view, before is None

    async def _secrets(self, conn: asyncpg.Connection, tenant: str, connection_id: str) -> dict[str, str]:
        sealed = await conn.fetchval(
            "SELECT sealed FROM connection_secrets WHERE tenant = $1 AND id = $2", tenant, connection_id
        )
        if sealed is None:
            return {}
        if self.box is None:
            raise EncryptionKeyMissing("the connection's secrets are sealed; AFORO_SECRET_KEYS opens them")
        return _secrets_decoder.decode(self.box.open(sealed, _context(tenant, connection_id)))

    async def get(self, tenant: str, connection_id: str) -> ConnectionView | None:
        views = await self._views(tenant, connection_id)
        return views[0] if views else None

    async def list(self, tenant: str | None = None) -> list[ConnectionView]:
        return await self._views(tenant, None)

    async def _views(self, tenant: str | None, connection_id: str | None) -> list[ConnectionView]:
        rows = await self.pool.fetch(
            """SELECT c.tenant, c.id, c.spec::text AS spec, c.created_at, c.updated_at,
                      c.last_sync::text AS last_sync, s.fields, s.key_id
               FROM connections c LEFT JOIN connection_secrets s ON s.tenant = c.tenant AND s.id = c.id
               WHERE ($1::text IS NULL OR c.tenant = $1) AND ($2::text IS NULL OR c.id = $2)
               ORDER BY c.tenant, c.id""",
            tenant,
            connection_id,
        )
        views = []
        for row in rows:
            spec = _spec_decoder.decode(row["spec"])
            fields = set(row["fields"] or ())
            views.append(
                ConnectionView(
                    id=row["id"],
                    tenant=row["tenant"],
                    type=spec.type,
                    base_url=spec.base_url,
                    workspace=spec.workspace,
                    control_plane_id=spec.control_plane_id,
                    organization=spec.organization,
                    environments=spec.environments,
                    username=spec.username,
                    token=REDACTED if "token" in fields else None,
                    password=REDACTED if "password" in fields else None,
                    secret_key_id=row["key_id"],
                    sync_interval_seconds=spec.interval(),
                    removal=spec.removal.value,
                    mapping=spec.mapping,
                    created_at=_iso(row["created_at"]),
                    updated_at=_iso(row["updated_at"]),
                    last_sync=None if row["last_sync"] is None else _sync_decoder.decode(row["last_sync"]),
                )
            )
        return views

    async def load(self, tenant: str, connection_id: str) -> ConnectionSpec | None:
        """The connection with its secrets opened, for a gateway client; None if none."""
        async with self.pool.acquire() as conn:
            text = await conn.fetchval(
                "SELECT spec::text FROM connections WHERE tenant = $1 AND id = $2", tenant, connection_id
            )
            if text is None:
                return None
            secrets = await self._secrets(conn, tenant, connection_id)
        return msgspec.structs.replace(_spec_decoder.decode(text), **secrets)

    async def delete(self, tenant: str, connection_id: str, actor: str) -> bool:
        async with self.pool.acquire() as conn, conn.transaction():
            before = await conn.fetchval(
                "DELETE FROM connections WHERE tenant = $1 AND id = $2 RETURNING spec::text",
                tenant,
                connection_id,
            )
            if before is None:
                return False
            await conn.execute(
                "DELETE FROM connection_objects WHERE tenant = $1 AND connection_id = $2",
                tenant,
                connection_id,
            )
            await audit.append(conn, actor, "connections.delete", tenant, connection_id, before, None)
        return True

    async def audit_push(
        self, tenant: str, connection_id: str, actor: str, action: str, detail: object
    ) -> None:
        """An audit row for a change pushed to the gateway through this connection."""
        async with self.pool.acquire() as conn:
            await audit.append(
                conn, actor, action, tenant, connection_id, None, msgspec.json.encode(detail).decode()
            )

    async def record_sync(self, tenant: str, connection_id: str, result: SyncResult) -> None:
        await self.pool.execute(
            "UPDATE connections SET last_sync = $3::jsonb WHERE tenant = $1 AND id = $2",
            tenant,
            connection_id,
            msgspec.json.encode(result).decode(),
        )

    async def owned(self, tenant: str, connection_id: str, kind: str) -> frozenset[str]:
        rows = await self.pool.fetch(
            """SELECT object_id FROM connection_objects
               WHERE tenant = $1 AND connection_id = $2 AND kind = $3""",
            tenant,
            connection_id,
            kind,
        )
        return frozenset(r["object_id"] for r in rows)

    async def owners(self, tenant: str, kind: str, object_id: str) -> list[str]:
        """The connections whose imports brought this object in."""
        rows = await self.pool.fetch(
            """SELECT connection_id FROM connection_objects
               WHERE tenant = $1 AND kind = $2 AND object_id = $3 ORDER BY connection_id""",
            tenant,
            kind,
            object_id,
        )
        return [r["connection_id"] for r in rows]

    async def imported(self, tenant: str, connection_id: str) -> bool:
        """Whether an import of this connection has been applied (so it syncs on its own)."""
        return await self.pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM connection_objects WHERE tenant = $1 AND connection_id = $2)",
            tenant,
            connection_id,
        )

    async def own(self, tenant: str, connection_id: str, kind: str, object_ids: set[str]) -> None:
        """Record that the connection's import brought these objects in (added to what it
        had: a revoked consumer stays the connection's)."""
        await self.pool.execute(
            """INSERT INTO connection_objects (tenant, connection_id, kind, object_id)
               SELECT $1, $2, $3, unnest($4::text[]) ON CONFLICT DO NOTHING""",
            tenant,
            connection_id,
            kind,
            sorted(object_ids),
        )
