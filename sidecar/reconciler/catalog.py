"""The admin write path with Postgres as the truth: the change commits in Postgres
with its audit row first, then goes straight to Redis, then every sidecar process is
told to drop its cache of the consumer. If Redis misses the second step, the
reconciler's change feed applies it within a second."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

import asyncpg
import msgspec

from sidecar.catalog import TruthUnavailable
from sidecar.config import Settings
from sidecar.core.access import ApiToken
from sidecar.core.clock import now_ms
from sidecar.core.models import ConsumerKey, ConsumerSpec, ConsumerStatus, ConsumerView, Plan
from sidecar.core.wallet_rules import Notice
from sidecar.reconciler.ledger import Ledger
from sidecar.reconciler.report import Report, reconciliation_report
from sidecar.reconciler.sync import apply_consumer
from sidecar.reconciler.tokens import TokenTable
from sidecar.standing_denials import ALL_CONSUMERS
from sidecar.store.base import TopUpResult
from sidecar.store.redis_store import RedisStore

log = logging.getLogger("aforo.admin")
# Postgres did not answer: the admin call fails whole (the truth is written first).
_UNREACHABLE = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.ObjectNotInPrerequisiteStateError,
    asyncpg.AdminShutdownError,
)


@contextlib.contextmanager
def _truth() -> Iterator[None]:
    try:
        yield
    except _UNREACHABLE as exc:
        raise TruthUnavailable(f"postgres unreachable: {exc!r}") from exc


class PostgresCatalog:
    def __init__(self, settings: Settings, store: RedisStore) -> None:
        self.settings = settings
        self.store = store
        self._pool: asyncpg.Pool | None = None
        self._opening = asyncio.Lock()

    async def start(self) -> None:
        """Open the pool now if Postgres answers; otherwise on the first admin call. The
        sidecar starts and decides from Redis whether or not Postgres is up."""
        try:
            with _truth():
                await self._ledger()
        except TruthUnavailable as exc:
            log.warning("postgres unreachable at start (%s); admin writes answer 503 until it is back", exc)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()

    async def ledger(self) -> Ledger:
        """The ledger over this catalog's pool (TruthUnavailable when Postgres is away)."""
        with _truth():
            return await self._ledger()

    async def _ledger(self) -> Ledger:
        async with self._opening:
            if self._pool is None:
                self._pool = await asyncio.wait_for(
                    asyncpg.create_pool(
                        self.settings.database_url, min_size=1, max_size=4, command_timeout=10
                    ),
                    timeout=5,
                )
        return Ledger(self._pool)

    async def _view(self, tenant: str, consumer_id: str) -> ConsumerView:
        view = await self.store.get_consumer(tenant, consumer_id, now_ms())
        assert view is not None  # just applied
        return view

    async def put_plan(self, plan: Plan, actor: str) -> bool:
        with _truth():
            ledger = await self._ledger()
            row, created = await ledger.put_plan(plan, actor)
        await self.store.apply_plan(row.plan, row.version)
        # Its consumers' limits changed: what any process remembers of them goes.
        await self.store.publish_invalidation(plan.tenant, ALL_CONSUMERS, wait=True)
        return created

    async def put_consumer(self, spec: ConsumerSpec, actor: str) -> tuple[ConsumerView, bool]:
        with _truth():
            ledger = await self._ledger()
            consumer, plan, created = await ledger.put_consumer(spec, actor)
        await apply_consumer(self.store, consumer, plan, wait=True)
        # Created, or restored after a deletion: Redis takes the wallet Postgres has
        # (version-guarded, so a no-op for a consumer Redis already holds).
        with _truth():
            ledger = await self._ledger()
            (wallet,) = await ledger.wallets(spec.tenant, spec.id)
        await self.store.settle(spec.tenant, spec.id, wallet.balance, wallet.settled, wallet.version)
        return await self._view(spec.tenant, spec.id), created

    async def set_status(
        self, tenant: str, consumer_id: str, status: ConsumerStatus, actor: str
    ) -> ConsumerView:
        with _truth():
            ledger = await self._ledger()
            consumer, plan = await ledger.set_status(tenant, consumer_id, status, actor)
        await apply_consumer(self.store, consumer, plan, wait=True)
        return await self._view(tenant, consumer_id)

    async def top_up(
        self, tenant: str, consumer_id: str, amount: int, reference: str | None, actor: str
    ) -> TopUpResult:
        with _truth():
            ledger = await self._ledger()
            wallet, applied = await ledger.top_up(tenant, consumer_id, amount, reference, actor)
        if applied:
            await self.store.top_up(tenant, consumer_id, amount, None, version=wallet.version)
        view = await self._view(tenant, consumer_id)
        return TopUpResult(balance=view.balance, applied=applied)

    async def add_key(self, tenant: str, consumer_id: str, key: ConsumerKey, actor: str) -> None:
        with _truth():
            ledger = await self._ledger()
            await ledger.add_key(tenant, consumer_id, key, actor)
        await self.store.add_key(tenant, consumer_id, msgspec.structs.replace(key, created_ms=now_ms()))

    async def revoke_key(self, tenant: str, consumer_id: str, key_hash: str, actor: str) -> bool:
        with _truth():
            ledger = await self._ledger()
            revoked = await ledger.revoke_key(tenant, consumer_id, key_hash, actor)
        if revoked:
            await self.store.revoke_key(tenant, consumer_id, key_hash)
            await self.store.publish_invalidation(tenant, consumer_id, wait=True)
        return revoked

    async def delete_plan(self, tenant: str, plan_id: str, actor: str) -> bool:
        with _truth():
            ledger = await self._ledger()
            deleted = await ledger.delete_plan(tenant, plan_id, actor)
        # Redis follows the truth (force: Postgres has checked no consumer is bound).
        await self.store.delete_plan(tenant, plan_id, force=True)
        return deleted

    async def delete_consumer(self, tenant: str, consumer_id: str, actor: str) -> bool:
        with _truth():
            ledger = await self._ledger()
            deleted = await ledger.delete_consumer(tenant, consumer_id, actor)
        await self.store.delete_consumer(tenant, consumer_id, now_ms())
        await self.store.publish_invalidation(tenant, consumer_id, wait=True)
        return deleted

    async def consumer_keys(self, tenant: str, consumer_id: str) -> list[ConsumerKey] | None:
        with _truth():
            ledger = await self._ledger()
            return await ledger.consumer_keys(tenant, consumer_id)

    async def notices(self, tenant: str, consumer_id: str) -> list[Notice] | None:
        """What the reconciler has drained to Postgres, then what is still in Redis."""
        with _truth():
            ledger = await self._ledger()
            if not await ledger.consumers(tenant, consumer_id):
                return None
            drained = await ledger.notices(tenant, consumer_id)
        seen = {n.id for n in drained}
        hot = await self.store.notices(tenant, consumer_id) or []
        return drained + [n for n in hot if n.id not in seen]

    async def _tokens(self) -> TokenTable:
        with _truth():
            return TokenTable((await self._ledger()).pool)

    async def put_token(self, token: ApiToken, action: str, actor: str) -> None:
        table = await self._tokens()
        with _truth():
            await table.put(token, action, actor)

    async def get_token(self, token_id: str) -> ApiToken | None:
        table = await self._tokens()
        with _truth():
            return await table.get(token_id)

    async def list_tokens(self, tenant: str) -> list[ApiToken]:
        table = await self._tokens()
        with _truth():
            return await table.list(tenant)

    async def touch_token(self, token_id: str, used_ms: int) -> None:
        table = await self._tokens()
        with _truth():
            await table.touch(token_id, used_ms)

    async def reconciliation(self, tenant: str | None = None) -> Report:
        with _truth():
            ledger = await self._ledger()
            return await reconciliation_report(ledger, self.store, self.settings.drift_threshold_pct, tenant)
