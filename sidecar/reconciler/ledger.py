"""The ledger: every read and write of the truth in Postgres (asyncpg)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec

from sidecar.core.alerts import balance_alerts, crossing_alerts, notice_alerts
from sidecar.core.errors import Conflict, InvalidInput, NotFound
from sidecar.core.models import (
    ConsumerKey,
    ConsumerSpec,
    ConsumerStatus,
    Plan,
    UsageEvent,
    UsageRecord,
    WalletMode,
)
from sidecar.core.money import MAX_MICROS
from sidecar.core.wallet_rules import AutoTopup, Notice
from sidecar.reconciler import rollups
from sidecar.reconciler.alerts import record_alerts, rules_of


class PlanRow(msgspec.Struct, frozen=True):
    plan: Plan
    version: int


class ConsumerRow(msgspec.Struct, frozen=True):
    tenant: str
    id: str
    plan_id: str
    status: ConsumerStatus
    wallet_mode: WalletMode
    version: int
    suspend_at_zero: bool | None = None
    auto_topup: AutoTopup | None = None

    def spec(self) -> ConsumerSpec:
        return ConsumerSpec(
            id=self.id,
            plan_id=self.plan_id,
            tenant=self.tenant,
            status=self.status,
            wallet_mode=self.wallet_mode,
            suspend_at_zero=self.suspend_at_zero,
            auto_topup=self.auto_topup,
        )


class WalletRow(msgspec.Struct, frozen=True):
    tenant: str
    consumer_id: str
    balance: int
    settled: int
    version: int


def _plan(row: asyncpg.Record) -> PlanRow:
    windows = msgspec.json.decode(row["windows"], type=dict[str, int])
    plan = Plan(
        id=row["id"],
        tenant=row["tenant"],
        windows=windows,
        price=row["price"],
        products=list(row["products"]),
        name=row["name"],
    )
    return PlanRow(plan, row["version"])


def _consumer(row: asyncpg.Record) -> ConsumerRow:
    return ConsumerRow(
        tenant=row["tenant"],
        id=row["id"],
        plan_id=row["plan_id"],
        status=ConsumerStatus(row["status"]),
        wallet_mode=WalletMode(row["wallet_mode"]),
        version=row["version"],
        suspend_at_zero=row["suspend_at_zero"],
        auto_topup=None if row["auto_topup"] is None else _auto_topup_decoder.decode(row["auto_topup"]),
    )


_auto_topup_decoder = msgspec.json.Decoder(AutoTopup)


def _wallet(row: asyncpg.Record) -> WalletRow:
    return WalletRow(row["tenant"], row["consumer_id"], row["balance"], row["settled_debits"], row["version"])


def _ts(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


_PLAN_COLUMNS = "tenant, id, name, windows::text AS windows, price, products, version"
_WALLET_COLUMNS = "tenant, consumer_id, balance, settled_debits, version"
_KEY_COLUMNS = (
    "k.key_hash, (extract(epoch FROM k.created_at) * 1000)::bigint AS created_ms,"
    " (extract(epoch FROM k.expires_at) * 1000)::bigint AS expires_ms, k.scopes"
)


def _key(row: asyncpg.Record) -> ConsumerKey:
    return ConsumerKey(row["key_hash"], row["created_ms"], row["expires_ms"], tuple(row["scopes"]))


class Ledger:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @contextlib.asynccontextmanager
    async def _change(self, actor: str) -> AsyncIterator[asyncpg.Connection]:
        """A transaction whose audit rows name ``actor``."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT set_config('aforo.actor', $1, true)", actor)
            yield conn

    # --- admin writes: one transaction each, audited by the triggers ---------------

    async def put_plan(self, plan: Plan, actor: str) -> tuple[PlanRow, bool]:
        async with self._change(actor) as conn:
            await conn.execute("INSERT INTO tenants (id) VALUES ($1) ON CONFLICT DO NOTHING", plan.tenant)
            row = await conn.fetchrow(
                f"""INSERT INTO plans (tenant, id, name, windows, price, products)
                    VALUES ($1, $2, $3, $4::jsonb, $5, $6)
                    ON CONFLICT (tenant, id) DO UPDATE SET name = EXCLUDED.name,
                        windows = EXCLUDED.windows, price = EXCLUDED.price, products = EXCLUDED.products,
                        deleted_at = NULL
                    RETURNING {_PLAN_COLUMNS}, (xmax = 0) AS created""",
                plan.tenant,
                plan.id,
                plan.name,
                msgspec.json.encode(plan.windows).decode(),
                plan.price,
                plan.products,
            )
        return _plan(row), row["created"]

    async def put_consumer(self, spec: ConsumerSpec, actor: str) -> tuple[ConsumerRow, PlanRow, bool]:
        async with self._change(actor) as conn:
            plan = await conn.fetchrow(
                f"""SELECT {_PLAN_COLUMNS} FROM plans WHERE tenant = $1 AND id = $2
                    AND deleted_at IS NULL FOR SHARE""",
                spec.tenant,
                spec.plan_id,
            )
            if plan is None:
                raise NotFound(f"plan {spec.plan_id!r} does not exist", code="plan_not_found")
            row = await conn.fetchrow(
                """INSERT INTO consumers
                       (tenant, id, plan_id, status, wallet_mode, suspend_at_zero, auto_topup)
                   VALUES ($1, $2, $3, coalesce($4, 'active'), coalesce($5, 'prepaid'), $6, $7::text::jsonb)
                   ON CONFLICT (tenant, id) DO UPDATE SET plan_id = EXCLUDED.plan_id,
                       status = coalesce($4, consumers.status),
                       wallet_mode = coalesce($5, consumers.wallet_mode),
                       suspend_at_zero = coalesce($6, consumers.suspend_at_zero),
                       auto_topup = coalesce($7::text::jsonb, consumers.auto_topup),
                       deleted_at = NULL
                   RETURNING *, (xmax = 0) AS created""",
                spec.tenant,
                spec.id,
                spec.plan_id,
                None if spec.status is None else spec.status.value,
                None if spec.wallet_mode is None else spec.wallet_mode.value,
                spec.suspend_at_zero,
                None if spec.auto_topup is None else msgspec.json.encode(spec.auto_topup).decode(),
            )
        return _consumer(row), _plan(plan), row["created"]

    async def set_status(
        self, tenant: str, consumer_id: str, status: ConsumerStatus, actor: str
    ) -> tuple[ConsumerRow, PlanRow]:
        async with self._change(actor) as conn:
            row = await conn.fetchrow(
                """UPDATE consumers SET status = $3 WHERE tenant = $1 AND id = $2 AND deleted_at IS NULL
                   RETURNING *""",
                tenant,
                consumer_id,
                status.value,
            )
            if row is None:
                raise NotFound(f"consumer {consumer_id!r} does not exist", code="consumer_not_found")
            plan = await conn.fetchrow(
                f"SELECT {_PLAN_COLUMNS} FROM plans WHERE tenant = $1 AND id = $2", tenant, row["plan_id"]
            )
        return _consumer(row), _plan(plan)

    async def top_up(
        self, tenant: str, consumer_id: str, amount: int, reference: str | None, actor: str
    ) -> tuple[WalletRow, bool]:
        """Credit the wallet once per reference; returns the wallet and whether it was applied."""
        async with self._change(actor) as conn:
            wallet = await conn.fetchrow(
                f"""SELECT {_WALLET_COLUMNS} FROM wallets w WHERE tenant = $1 AND consumer_id = $2
                    AND EXISTS (SELECT 1 FROM consumers c WHERE c.tenant = w.tenant
                                AND c.id = w.consumer_id AND c.deleted_at IS NULL)
                    FOR UPDATE""",
                tenant,
                consumer_id,
            )
            if wallet is None:
                raise NotFound(f"consumer {consumer_id!r} does not exist", code="consumer_not_found")
            inserted = await conn.fetchval(
                """INSERT INTO wallet_transactions (tenant, consumer_id, kind, amount, reference)
                   VALUES ($1, $2, 'topup', $3, $4) ON CONFLICT DO NOTHING RETURNING id""",
                tenant,
                consumer_id,
                amount,
                reference,
            )
            if inserted is None:
                return _wallet(wallet), False
            if wallet["balance"] + amount > MAX_MICROS:
                raise InvalidInput(
                    f"the balance would exceed {MAX_MICROS} micros", code="invalid_amount", field="amount"
                )
            row = await conn.fetchrow(
                f"""UPDATE wallets SET balance = balance + $3 WHERE tenant = $1 AND consumer_id = $2
                    RETURNING {_WALLET_COLUMNS}""",
                tenant,
                consumer_id,
                amount,
            )
        return _wallet(row), True

    async def add_key(self, tenant: str, consumer_id: str, key: ConsumerKey, actor: str) -> None:
        async with self._change(actor) as conn:
            exists = await conn.fetchval(
                "SELECT 1 FROM consumers WHERE tenant = $1 AND id = $2 AND deleted_at IS NULL",
                tenant,
                consumer_id,
            )
            if exists is None:
                raise NotFound(f"consumer {consumer_id!r} does not exist", code="consumer_not_found")
            # Registered again to its own consumer: kept (and restored if it was revoked,
            # an imported key back in the gateway) with the expiry and scopes given now;
            # another consumer's: refused.
            owner = await conn.fetchval(
                """INSERT INTO api_keys (tenant, key_hash, consumer_id, expires_at, scopes)
                   VALUES ($1, $2, $3, $4, $5)
                   ON CONFLICT (tenant, key_hash) DO UPDATE
                   SET revoked_at = NULL, expires_at = EXCLUDED.expires_at, scopes = EXCLUDED.scopes
                   WHERE api_keys.consumer_id = EXCLUDED.consumer_id
                   RETURNING consumer_id""",
                tenant,
                key.key_hash,
                consumer_id,
                None if key.expires_ms is None else _ts(key.expires_ms),
                list(key.scopes),
            )
            if owner is None:
                raise Conflict("this key is registered to another consumer", code="key_in_use")

    async def revoke_key(self, tenant: str, consumer_id: str, key_hash: str, actor: str) -> bool:
        async with self._change(actor) as conn:
            revoked = await conn.fetchval(
                """UPDATE api_keys SET revoked_at = now()
                   WHERE tenant = $1 AND consumer_id = $2 AND key_hash = $3 AND revoked_at IS NULL
                   RETURNING 1""",
                tenant,
                consumer_id,
                key_hash,
            )
        return revoked is not None

    async def delete_consumer(self, tenant: str, consumer_id: str, actor: str) -> bool:
        """Soft delete: the row, its wallet, transactions and usage stay for billing;
        its keys are revoked. False if there was no such (undeleted) consumer."""
        async with self._change(actor) as conn:
            deleted = await conn.fetchval(
                """UPDATE consumers SET deleted_at = now()
                   WHERE tenant = $1 AND id = $2 AND deleted_at IS NULL RETURNING 1""",
                tenant,
                consumer_id,
            )
            if deleted is None:
                return False
            await conn.execute(
                """UPDATE api_keys SET revoked_at = now()
                   WHERE tenant = $1 AND consumer_id = $2 AND revoked_at IS NULL""",
                tenant,
                consumer_id,
            )
        return True

    async def delete_plan(self, tenant: str, plan_id: str, actor: str) -> bool:
        """Soft delete, refused (Conflict plan_in_use) while undeleted consumers are bound."""
        async with self._change(actor) as conn:
            plan = await conn.fetchval(
                "SELECT 1 FROM plans WHERE tenant = $1 AND id = $2 AND deleted_at IS NULL FOR UPDATE",
                tenant,
                plan_id,
            )
            if plan is None:
                return False
            bound = await conn.fetchval(
                "SELECT count(*) FROM consumers WHERE tenant = $1 AND plan_id = $2 AND deleted_at IS NULL",
                tenant,
                plan_id,
            )
            if bound:
                raise Conflict(
                    f"plan {plan_id!r} has {bound} consumers bound to it; move or delete them first",
                    code="plan_in_use",
                )
            await conn.execute(
                "UPDATE plans SET deleted_at = now() WHERE tenant = $1 AND id = $2", tenant, plan_id
            )
        return True

    # --- reads for the sync (deleted rows are not the truth of the hot store) --------

    async def plans(self, tenant: str | None = None, plan_id: str | None = None) -> list[PlanRow]:
        rows = await self.pool.fetch(
            f"""SELECT {_PLAN_COLUMNS} FROM plans WHERE deleted_at IS NULL
                AND ($1::text IS NULL OR tenant = $1) AND ($2::text IS NULL OR id = $2)""",
            tenant,
            plan_id,
        )
        return [_plan(r) for r in rows]

    async def consumers(
        self, tenant: str | None = None, consumer_id: str | None = None, plan_id: str | None = None
    ) -> list[ConsumerRow]:
        rows = await self.pool.fetch(
            """SELECT * FROM consumers WHERE deleted_at IS NULL AND ($1::text IS NULL OR tenant = $1)
                   AND ($2::text IS NULL OR id = $2) AND ($3::text IS NULL OR plan_id = $3)""",
            tenant,
            consumer_id,
            plan_id,
        )
        return [_consumer(r) for r in rows]

    async def active_keys(
        self, tenant: str | None = None, consumer_id: str | None = None
    ) -> dict[tuple[str, str], dict[str, ConsumerKey]]:
        """The unrevoked keys of undeleted consumers, by consumer then hash."""
        rows = await self.pool.fetch(
            f"""SELECT k.tenant, k.consumer_id, {_KEY_COLUMNS} FROM api_keys k
                   JOIN consumers c ON c.tenant = k.tenant AND c.id = k.consumer_id AND c.deleted_at IS NULL
                   WHERE k.revoked_at IS NULL
                   AND ($1::text IS NULL OR k.tenant = $1) AND ($2::text IS NULL OR k.consumer_id = $2)""",
            tenant,
            consumer_id,
        )
        keys: dict[tuple[str, str], dict[str, ConsumerKey]] = {}
        for r in rows:
            keys.setdefault((r["tenant"], r["consumer_id"]), {})[r["key_hash"]] = _key(r)
        return keys

    async def consumer_keys(self, tenant: str, consumer_id: str) -> list[ConsumerKey] | None:
        """The consumer's active keys with their registration time (None: no such
        consumer, or deleted)."""
        async with self.pool.acquire() as conn:
            exists = await conn.fetchval(
                "SELECT 1 FROM consumers WHERE tenant = $1 AND id = $2 AND deleted_at IS NULL",
                tenant,
                consumer_id,
            )
            if exists is None:
                return None
            rows = await conn.fetch(
                f"""SELECT {_KEY_COLUMNS} FROM api_keys k
                   WHERE tenant = $1 AND consumer_id = $2 AND revoked_at IS NULL ORDER BY key_hash""",
                tenant,
                consumer_id,
            )
        return [_key(r) for r in rows]

    async def wallets(self, tenant: str | None = None, consumer_id: str | None = None) -> list[WalletRow]:
        rows = await self.pool.fetch(
            f"""SELECT {_WALLET_COLUMNS} FROM wallets w WHERE ($1::text IS NULL OR tenant = $1)
                   AND ($2::text IS NULL OR consumer_id = $2)
                   AND EXISTS (SELECT 1 FROM consumers c WHERE c.tenant = w.tenant
                               AND c.id = w.consumer_id AND c.deleted_at IS NULL)""",
            tenant,
            consumer_id,
        )
        return [_wallet(r) for r in rows]

    # --- usage -----------------------------------------------------------------------

    async def settle_usage(
        self, tenant: str, consumer_id: str, records: Sequence[UsageRecord], batch_reference: str
    ) -> tuple[WalletRow | None, int]:
        """Record a batch of one consumer's usage and debit its wallet by the cost of the
        rows that were new, in one transaction. Rows already recorded (a batch resent
        after a crash) are neither recorded nor debited again. Returns the wallet after
        (None: Postgres has never had this consumer, so no wallet to charge; the rows are
        recorded all the same) and the number of new rows."""
        async with self.pool.acquire() as conn, conn.transaction():
            # The settlement moves wallets all day; the usage ledger is its audit.
            await conn.execute("SELECT set_config('aforo.origin', 'settlement', true)")
            new = await conn.fetch(
                """INSERT INTO usage_records
                       (tenant, consumer_id, request_id, decision_id, ts, product, operation, cost, hits)
                   SELECT $1, $2, * FROM unnest($3::text[], $4::text[], $5::timestamptz[], $6::text[],
                                                $7::text[], $8::bigint[], $9::bigint[])
                   ON CONFLICT DO NOTHING RETURNING decision_id, cost, ts, product, hits""",
                tenant,
                consumer_id,
                [r.request_id for r in records],
                [r.decision_id for r in records],
                [_ts(r.ts_ms) for r in records],
                [r.product for r in records],
                [r.operation for r in records],
                [r.cost for r in records],
                [r.hits for r in records],
            )
            debit = sum(r["cost"] for r in new)
            await rollups.add_usage(conn, tenant, consumer_id, new)  # the new rows only
            # The quota levels the new rows' calls crossed, with them or not at all.
            await record_alerts(conn, crossing_alerts(records, {r["decision_id"] for r in new}))
            known = await conn.fetchval(
                "SELECT 1 FROM consumers WHERE tenant = $1 AND id = $2", tenant, consumer_id
            )
            if known is None:
                return None, len(new)
            await conn.execute(
                "INSERT INTO wallets (tenant, consumer_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                tenant,
                consumer_id,
            )
            if debit:
                await conn.execute(
                    """INSERT INTO wallet_transactions (tenant, consumer_id, kind, amount, reference)
                       VALUES ($1, $2, 'usage', $3, $4)""",
                    tenant,
                    consumer_id,
                    -debit,
                    batch_reference,
                )
                row = await conn.fetchrow(
                    f"""UPDATE wallets SET balance = balance - $3, settled_debits = settled_debits + $3
                        WHERE tenant = $1 AND consumer_id = $2 RETURNING {_WALLET_COLUMNS}""",
                    tenant,
                    consumer_id,
                    debit,
                )
                # Settlements of a consumer are serialised by its wallet row: the one that
                # takes the balance across a threshold is the only one to see it.
                rules = (await rules_of(conn, {tenant}))[tenant]
                last_ms = max(r.ts_ms for r in records)
                await record_alerts(
                    conn,
                    balance_alerts(
                        tenant,
                        consumer_id,
                        row["balance"] + debit,
                        row["balance"],
                        last_ms,
                        batch_reference,
                        rules.low_balance_micros,
                    ),
                )
            else:
                row = await conn.fetchrow(
                    f"SELECT {_WALLET_COLUMNS} FROM wallets WHERE tenant = $1 AND consumer_id = $2",
                    tenant,
                    consumer_id,
                )
        return _wallet(row), len(new)

    async def record_events(self, events: Sequence[UsageEvent], received_ms: Sequence[int]) -> int:
        """Record gateway events, each once per (tenant, consumer, request id, the time
        Redis received it: ``received_ms``, its stream entry's), so a batch drained again
        is skipped; returns how many were new. Their rollups in the same transaction."""
        columns: dict[str, list[Any]] = {
            name: [getattr(e, name) for e in events]
            for name in (
                "tenant", "consumer_id", "request_id", "product", "route", "service", "method", "status",
                "latency_ms", "upstream_latency_ms", "gateway_latency_ms", "request_size", "response_size",
                "decision_id", "count", "errors",
            )
        }  # fmt: skip
        started = [_ts(e.started_at_ms) if e.started_at_ms else None for e in events]
        headers = [msgspec.json.encode(e.headers).decode() for e in events]
        async with self.pool.acquire() as conn, conn.transaction():
            inserted = await conn.fetch(
                """INSERT INTO gateway_events (tenant, consumer_id, request_id, product, route, service,
                       method, status, latency_ms, upstream_latency_ms, gateway_latency_ms, request_size,
                       response_size, decision_id, count, errors, started_at, headers, received_at)
                   SELECT t, c, r, p, ro, s, m, st, l, ul, gl, rq, rs, d, n, e, sa, h::jsonb, ra FROM unnest(
                       $1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                       $8::int[], $9::bigint[], $10::bigint[], $11::bigint[], $12::bigint[], $13::bigint[],
                       $14::text[], $15::bigint[], $16::bigint[], $17::timestamptz[], $18::text[],
                       $19::timestamptz[])
                       AS u(t, c, r, p, ro, s, m, st, l, ul, gl, rq, rs, d, n, e, sa, h, ra)
                   ON CONFLICT DO NOTHING
                   RETURNING tenant, consumer_id, product, status, count, errors,
                       request_size + response_size AS bytes, coalesce(started_at, recorded_at) AS at""",
                *columns.values(),
                started,
                headers,
                [_ts(ms) for ms in received_ms],
            )
            await rollups.add_events(conn, inserted)  # the new events only
        return len(inserted)

    async def record_notices(self, tenant: str, consumer_id: str, notices: list[Notice]) -> int:
        """Record wallet notices, each once (by id), and the alerts of the new ones in
        the same transaction; returns how many were new."""
        async with self.pool.acquire() as conn, conn.transaction():
            inserted = await self._insert_notices(conn, tenant, consumer_id, notices)
            new = {r["id"] for r in inserted}
            await record_alerts(conn, notice_alerts(tenant, consumer_id, [n for n in notices if n.id in new]))
        return len(inserted)

    @staticmethod
    async def _insert_notices(
        conn: asyncpg.Connection, tenant: str, consumer_id: str, notices: list[Notice]
    ) -> list[asyncpg.Record]:
        return await conn.fetch(
            """INSERT INTO wallet_notices
                   (tenant, consumer_id, id, type, at, balance, threshold, amount, currency)
               SELECT $1, $2, i, ty, a, b, th, am, cu FROM unnest(
                   $3::text[], $4::text[], $5::timestamptz[], $6::bigint[], $7::bigint[], $8::bigint[],
                   $9::text[])
                   AS n(i, ty, a, b, th, am, cu)
               ON CONFLICT DO NOTHING RETURNING id""",
            tenant,
            consumer_id,
            [n.id for n in notices],
            [n.type for n in notices],
            [_ts(n.at_ms) for n in notices],
            [n.balance for n in notices],
            [n.threshold for n in notices],
            [n.amount for n in notices],
            [n.currency for n in notices],
        )

    async def notices(self, tenant: str, consumer_id: str) -> list[Notice]:
        rows = await self.pool.fetch(
            """SELECT id, type, (extract(epoch FROM at) * 1000)::bigint AS at_ms, balance, threshold, amount,
                      currency
               FROM wallet_notices WHERE tenant = $1 AND consumer_id = $2 ORDER BY at, id""",
            tenant,
            consumer_id,
        )
        return [Notice(**dict(r)) for r in rows]

    async def usage_hits(self, tenant: str, consumer_id: str, start: datetime, end: datetime) -> int:
        return await self.pool.fetchval(
            """SELECT coalesce(sum(hits), 0)::bigint FROM usage_records
               WHERE tenant = $1 AND consumer_id = $2 AND ts >= $3 AND ts < $4""",
            tenant,
            consumer_id,
            start,
            end,
        )
