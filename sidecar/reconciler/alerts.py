"""Alerts into Postgres with their webhook deliveries (the transactional outbox), and
the tenants' alert rules.

``record_alerts`` runs inside the caller's transaction (the one that writes the usage
rows or the wallet notices the alerts come from), so an alert and its deliveries are
committed with their cause or not at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import asyncpg
import msgspec

from sidecar.core.alerts import AlertRules, NewAlert

_encoder = msgspec.json.Encoder()


class AlertRecord(msgspec.Struct):
    """An alert as GET /v1/admin/alerts lists it and a webhook's ``data`` carries it."""

    id: str
    tenant: str
    consumer_id: str
    type: str
    at: str  # ISO 8601 UTC: when it happened
    data: dict[str, object]


def payload(alert: AlertRecord) -> str:
    """The webhook body (Standard Webhooks' type / timestamp / data)."""
    return _encoder.encode({"type": alert.type, "timestamp": alert.at, "data": alert}).decode()


def alert_record(row: asyncpg.Record) -> AlertRecord:
    return AlertRecord(
        id=str(row["id"]),
        tenant=row["tenant"],
        consumer_id=row["consumer_id"],
        type=row["type"],
        at=row["at"].astimezone(UTC).isoformat().replace("+00:00", "Z"),
        data=msgspec.json.decode(row["data"]),
    )


ALERT_COLUMNS = "id, tenant, consumer_id, type, at, data::text AS data"
_rules_decoder = msgspec.json.Decoder(AlertRules)


async def rules_of(conn: asyncpg.Connection, tenants: set[str]) -> dict[str, AlertRules]:
    """Each tenant's alert rules (the defaults where it has none)."""
    rows = await conn.fetch(
        "SELECT tenant, rules::text AS rules FROM alert_rules WHERE tenant = ANY ($1::text[])", list(tenants)
    )
    held = {r["tenant"]: _rules_decoder.decode(r["rules"]) for r in rows}
    return {t: held.get(t) or AlertRules(tenant=t) for t in tenants}


async def put_rules(conn: asyncpg.Connection, rules: AlertRules) -> None:
    await conn.execute("INSERT INTO tenants (id) VALUES ($1) ON CONFLICT DO NOTHING", rules.tenant)
    await conn.execute(
        """INSERT INTO alert_rules (tenant, rules) VALUES ($1, $2::jsonb)
           ON CONFLICT (tenant) DO UPDATE SET rules = EXCLUDED.rules, updated_at = now()""",
        rules.tenant,
        _encoder.encode(rules).decode(),
    )


async def record_alerts(conn: asyncpg.Connection, alerts: Sequence[NewAlert]) -> int:
    """Record ``alerts``, each once (by tenant, consumer, type and key), and a pending
    delivery of each new one to every webhook of its tenant subscribed to its type.
    Returns how many alerts were new."""
    if alerts:
        rules = await rules_of(conn, {a.tenant for a in alerts})
        alerts = [a for a in alerts if rules[a.tenant].fires(a)]
    if not alerts:
        return 0
    rows = await conn.fetch(
        f"""INSERT INTO alerts (tenant, consumer_id, type, key, at, data)
            SELECT t, c, ty, k, a, d::jsonb FROM unnest(
                $1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::text[])
                WITH ORDINALITY AS n(t, c, ty, k, a, d, o)
            ORDER BY o
            ON CONFLICT DO NOTHING RETURNING {ALERT_COLUMNS}""",
        [a.tenant for a in alerts],
        [a.consumer_id for a in alerts],
        [a.type.value for a in alerts],
        [a.key for a in alerts],
        [datetime.fromtimestamp(a.at_ms / 1000, UTC) for a in alerts],
        [_encoder.encode(a.data).decode() for a in alerts],
    )
    if rows:
        rows = sorted(rows, key=lambda r: r["id"])
        await conn.execute(
            """INSERT INTO webhook_deliveries
                   (tenant, webhook_id, alert_id, message_id, event_type, consumer_id, payload)
               SELECT w.tenant, w.id, a.id, 'msg_' || a.id, a.type, a.consumer_id, a.payload
               FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[])
                   AS a(id, tenant, consumer_id, type, payload)
               JOIN webhooks w ON w.tenant = a.tenant AND a.type = ANY (w.events) AND w.deleted_at IS NULL
               ORDER BY a.id, w.id""",
            [r["id"] for r in rows],
            [r["tenant"] for r in rows],
            [r["consumer_id"] for r in rows],
            [r["type"] for r in rows],
            [payload(alert_record(r)) for r in rows],
        )
    return len(rows)
