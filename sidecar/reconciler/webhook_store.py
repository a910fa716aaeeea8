"""Webhook endpoints, their delivery log, the alerts and the tenants' alert rules, in Postgres.

The signing secret is made here, sealed with the secret box (bound to the endpoint's
row), answered once to the call that made it and never again; the audit rows of a
change hold the endpoint without it.
"""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg
import msgspec

from sidecar.core.alerts import AlertRules
from sidecar.core.errors import Conflict
from sidecar.core.webhooks import WebhookSpec, new_secret
from sidecar.integrations.connection_store import EncryptionKeyMissing
from sidecar.integrations.secret_box import SecretBox
from sidecar.reconciler import audit
from sidecar.reconciler.alerts import ALERT_COLUMNS, AlertRecord, alert_record, put_rules, rules_of


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def secret_context(tenant: str, webhook_id: str) -> str:
    """The associated data that binds a sealed signing secret to its endpoint."""
    return f"webhook:{tenant}:{webhook_id}"


class WebhookView(msgspec.Struct, omit_defaults=True):
    id: str
    tenant: str
    url: str
    events: list[str]
    enabled: bool
    description: str
    created_at: str
    updated_at: str
    # Only in the answer that made it (creation, rotation): keep it, it is not shown again.
    secret: str | None = None


class Attempt(msgspec.Struct):
    attempt: int
    at: str
    status: int | None  # the receiver's HTTP status (None: no answer)
    error: str  # '' when delivered
    duration_ms: int


class DeliveryView(msgspec.Struct):
    id: str
    message_id: str  # the webhook-id header: the same on every attempt and redelivery
    event_type: str
    consumer_id: str
    status: str  # pending, delivered, failed (given up)
    attempts: int
    created_at: str
    next_attempt_at: str | None  # pending only
    last_attempt_at: str | None
    last_status: int | None
    last_error: str | None
    delivered_at: str | None
    history: list[Attempt]


_WEBHOOK_COLUMNS = "tenant, id, url, events, enabled, description, created_at, updated_at"
_DELIVERY_COLUMNS = (
    "id, message_id, event_type, consumer_id, status, attempts, created_at, next_attempt_at,"
    " last_attempt_at, last_status, last_error, delivered_at"
)


def _view(row: asyncpg.Record, secret: str | None = None) -> WebhookView:
    return WebhookView(
        id=row["id"],
        tenant=row["tenant"],
        url=row["url"],
        events=list(row["events"]),
        enabled=row["enabled"],
        description=row["description"],
        created_at=_iso(row["created_at"]) or "",
        updated_at=_iso(row["updated_at"]) or "",
        secret=secret,
    )


def _public(view: WebhookView) -> str:
    """The endpoint as the audit log holds it: never the secret."""
    return msgspec.json.encode(msgspec.structs.replace(view, secret=None)).decode()


class WebhookStore:
    def __init__(self, pool: asyncpg.Pool, box: SecretBox | None) -> None:
        self.pool = pool
        self.box = box

    def _seal(self, tenant: str, webhook_id: str) -> tuple[str, str]:
        if self.box is None:
            raise EncryptionKeyMissing(
                "a webhook's signing secret needs AFORO_SECRET_KEYS to be sealed at rest"
            )
        secret = new_secret()
        return secret, self.box.seal(secret, secret_context(tenant, webhook_id))

    async def put(self, webhook_id: str, spec: WebhookSpec, actor: str) -> tuple[WebhookView, bool]:
        """Create (with a new secret, answered once) or replace an endpoint; its secret
        stays on replace. A deleted endpoint put again is created anew."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("INSERT INTO tenants (id) VALUES ($1) ON CONFLICT DO NOTHING", spec.tenant)
            before = await conn.fetchrow(
                f"""SELECT {_WEBHOOK_COLUMNS} FROM webhooks
                    WHERE tenant = $1 AND id = $2 AND deleted_at IS NULL FOR UPDATE""",
                spec.tenant,
                webhook_id,
            )
            secret = None
            if before is None:
                secret, sealed = self._seal(spec.tenant, webhook_id)
                row = await conn.fetchrow(
                    f"""INSERT INTO webhooks (tenant, id, url, events, enabled, description, sealed_secret)
                        VALUES ($1, $2, $3, $4, $5, $6, $7)
                        ON CONFLICT (tenant, id) DO UPDATE SET url = EXCLUDED.url, events = EXCLUDED.events,
                            enabled = EXCLUDED.enabled, description = EXCLUDED.description,
                            sealed_secret = EXCLUDED.sealed_secret, created_at = now(), updated_at = now(),
                            deleted_at = NULL
                        RETURNING {_WEBHOOK_COLUMNS}""",
                    spec.tenant,
                    webhook_id,
                    spec.url,
                    spec.events,
                    spec.enabled,
                    spec.description,
                    sealed,
                )
            else:
                row = await conn.fetchrow(
                    f"""UPDATE webhooks SET url = $3, events = $4, enabled = $5, description = $6,
                            updated_at = now()
                        WHERE tenant = $1 AND id = $2 RETURNING {_WEBHOOK_COLUMNS}""",
                    spec.tenant,
                    webhook_id,
                    spec.url,
                    spec.events,
                    spec.enabled,
                    spec.description,
                )
            view = _view(row, secret)
            await audit.append(
                conn,
                actor,
                "webhooks.put",
                spec.tenant,
                webhook_id,
                None if before is None else _public(_view(before)),
                _public(view),
            )
        return view, before is None

    async def rotate_secret(self, tenant: str, webhook_id: str, actor: str) -> WebhookView | None:
        """A new signing secret, answered once; deliveries from now on are signed with it."""
        if await self.get(tenant, webhook_id) is None:
            return None
        secret, sealed = self._seal(tenant, webhook_id)
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"""UPDATE webhooks SET sealed_secret = $3, updated_at = now()
                    WHERE tenant = $1 AND id = $2 AND deleted_at IS NULL RETURNING {_WEBHOOK_COLUMNS}""",
                tenant,
                webhook_id,
                sealed,
            )
            if row is None:
                return None
            await audit.append(conn, actor, "webhooks.rotate_secret", tenant, webhook_id, None, None)
        return _view(row, secret)

    async def get(self, tenant: str, webhook_id: str) -> WebhookView | None:
        row = await self.pool.fetchrow(
            f"SELECT {_WEBHOOK_COLUMNS} FROM webhooks WHERE tenant = $1 AND id = $2 AND deleted_at IS NULL",
            tenant,
            webhook_id,
        )
        return None if row is None else _view(row)

    async def list(self, tenant: str) -> list[WebhookView]:
        rows = await self.pool.fetch(
            f"""SELECT {_WEBHOOK_COLUMNS} FROM webhooks WHERE tenant = $1 AND deleted_at IS NULL
                ORDER BY id""",
            tenant,
        )
        return [_view(r) for r in rows]

    async def delete(self, tenant: str, webhook_id: str, actor: str) -> bool:
        """Soft delete; its pending deliveries are given up (the log stays)."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"""UPDATE webhooks SET deleted_at = now() WHERE tenant = $1 AND id = $2
                    AND deleted_at IS NULL RETURNING {_WEBHOOK_COLUMNS}""",
                tenant,
                webhook_id,
            )
            if row is None:
                return False
            await conn.execute(
                """UPDATE webhook_deliveries SET status = 'failed', lease_until = NULL,
                       last_error = 'the webhook was deleted'
                   WHERE tenant = $1 AND webhook_id = $2 AND status = 'pending'""",
                tenant,
                webhook_id,
            )
            await audit.append(conn, actor, "webhooks.delete", tenant, webhook_id, _public(_view(row)), None)
        return True

    async def deliveries(
        self, tenant: str, webhook_id: str, status: str | None, limit: int, before_id: int | None
    ) -> list[DeliveryView]:
        """The delivery log, newest first, with every attempt."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                f"""SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries
                    WHERE tenant = $1 AND webhook_id = $2 AND ($3::text IS NULL OR status = $3)
                    AND ($4::bigint IS NULL OR id < $4)
                    ORDER BY id DESC LIMIT $5""",
                tenant,
                webhook_id,
                status,
                before_id,
                limit,
            )
            attempts = await conn.fetch(
                """SELECT delivery_id, attempt, at, status, error, duration_ms FROM webhook_attempts
                   WHERE delivery_id = ANY ($1::bigint[]) ORDER BY delivery_id, attempt""",
                [r["id"] for r in rows],
            )
        history: dict[int, list[Attempt]] = {}
        for a in attempts:
            history.setdefault(a["delivery_id"], []).append(
                Attempt(a["attempt"], _iso(a["at"]) or "", a["status"], a["error"], a["duration_ms"])
            )
        return [
            DeliveryView(
                id=str(r["id"]),
                message_id=r["message_id"],
                event_type=r["event_type"],
                consumer_id=r["consumer_id"],
                status=r["status"],
                attempts=r["attempts"],
                created_at=_iso(r["created_at"]) or "",
                next_attempt_at=_iso(r["next_attempt_at"]) if r["status"] == "pending" else None,
                last_attempt_at=_iso(r["last_attempt_at"]),
                last_status=r["last_status"],
                last_error=r["last_error"],
                delivered_at=_iso(r["delivered_at"]),
                history=history.get(r["id"], []),
            )
            for r in rows
        ]

    async def redeliver(self, tenant: str, webhook_id: str, delivery_id: int, actor: str) -> bool:
        """Send a delivery again (same webhook-id), retried for a full period from now.
        False: no such delivery. Conflict while it is being sent."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                """SELECT status, lease_until > now() AS sending FROM webhook_deliveries
                   WHERE tenant = $1 AND webhook_id = $2 AND id = $3 FOR UPDATE""",
                tenant,
                webhook_id,
                delivery_id,
            )
            if row is None:
                return False
            if row["status"] == "pending" and row["sending"]:
                raise Conflict("this delivery is being sent now", code="delivery_in_flight")
            await conn.execute(
                """UPDATE webhook_deliveries SET status = 'pending', retry_since = now(),
                       next_attempt_at = now(), lease_until = NULL
                   WHERE id = $1""",
                delivery_id,
            )
            await audit.append(
                conn,
                actor,
                "webhooks.redeliver",
                tenant,
                webhook_id,
                None,
                f'{{"delivery_id": {delivery_id}}}',
            )
        return True

    async def rules(self, tenant: str) -> AlertRules:
        async with self.pool.acquire() as conn:
            return (await rules_of(conn, {tenant}))[tenant]

    async def put_rules(self, rules: AlertRules, actor: str) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            before = (await rules_of(conn, {rules.tenant}))[rules.tenant]
            await put_rules(conn, rules)
            encode = msgspec.json.encode
            await audit.append(
                conn,
                actor,
                "alert_rules.put",
                rules.tenant,
                rules.tenant,
                encode(before).decode(),
                encode(rules).decode(),
            )

    async def alerts(
        self,
        tenant: str,
        consumer_id: str | None,
        alert_type: str | None,
        limit: int,
        before_id: int | None,
    ) -> list[AlertRecord]:
        """What fired, newest first."""
        rows = await self.pool.fetch(
            f"""SELECT {ALERT_COLUMNS} FROM alerts WHERE tenant = $1
                AND ($2::text IS NULL OR consumer_id = $2) AND ($3::text IS NULL OR type = $3)
                AND ($4::bigint IS NULL OR id < $4)
                ORDER BY id DESC LIMIT $5""",
            tenant,
            consumer_id,
            alert_type,
            before_id,
            limit,
        )
        return [alert_record(r) for r in rows]
