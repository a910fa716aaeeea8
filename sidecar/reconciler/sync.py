"""Bring Redis in step with Postgres: everything (full sync) or one changed row."""

from __future__ import annotations

import logging

from sidecar.background import gather_bounded
from sidecar.core.clock import now_ms
from sidecar.reconciler.ledger import ConsumerRow, Ledger, PlanRow, WalletRow
from sidecar.store.redis_store import RedisStore

log = logging.getLogger("aforo.reconciler")
# Consumers synced at once during a full sync (each is a few Redis round trips).
_PARALLEL = 32


async def apply_consumer(
    store: RedisStore, consumer: ConsumerRow, plan: PlanRow, *, wait: bool = False
) -> None:
    """``wait``: an admin change, answered once every process has dropped what it
    remembered of the consumer (a full sync does not wait per consumer)."""
    await store.apply_consumer(consumer.spec(), plan.plan, plan.version, now_ms())
    await store.publish_invalidation(consumer.tenant, consumer.id, wait=wait)


async def apply_wallet(store: RedisStore, wallet: WalletRow, trim_before: str | None = None) -> bool:
    return await store.settle(
        wallet.tenant, wallet.consumer_id, wallet.balance, wallet.settled, wallet.version, trim_before
    )


async def full_sync(ledger: Ledger, store: RedisStore) -> dict[str, int]:
    """Copy every plan, consumer, key set and wallet from Postgres into Redis.

    Versions guard every write, so a full sync racing the change feed or the admin
    API never puts an older state back."""
    plans = {(p.plan.tenant, p.plan.id): p for p in await ledger.plans()}
    consumers = await ledger.consumers()
    keys = await ledger.active_keys()
    wallets = await ledger.wallets()
    for plan in plans.values():
        await store.apply_plan(plan.plan, plan.version)
    await gather_bounded(
        (apply_consumer(store, c, plans[(c.tenant, c.plan_id)]) for c in consumers), _PARALLEL
    )
    await gather_bounded(
        (store.apply_keys(c.tenant, c.id, keys.get((c.tenant, c.id), {})) for c in consumers), _PARALLEL
    )
    await gather_bounded((apply_wallet(store, w) for w in wallets), _PARALLEL)
    counts = {"plans": len(plans), "consumers": len(consumers), "wallets": len(wallets)}
    counts["removed"] = await remove_stale(ledger, store, plans, consumers, keys)
    log.info("full sync: %s", counts)
    return counts


async def remove_stale(
    ledger: Ledger,
    store: RedisStore,
    plans: dict[tuple[str, str], PlanRow],
    consumers: list[ConsumerRow],
    keys: dict[tuple[str, str], set[str]],
) -> int:
    """Remove from Redis what the truth no longer has (deleted, or never there): plans,
    consumers (their usage not yet drained stays), API key index entries, index and
    member set entries. Postgres is asked again before each removal: what was created
    after the snapshot above is kept."""
    held = {(c.tenant, c.id) for c in consumers}
    removed = 0
    for tenant, consumer_id in await store.scan_consumers():
        if (tenant, consumer_id) not in held and not await ledger.consumers(tenant, consumer_id):
            await store.delete_consumer(tenant, consumer_id, now_ms())
            await store.publish_invalidation(tenant, consumer_id)
            removed += 1
    for tenant, plan_id in await store.scan_plans():
        if (tenant, plan_id) not in plans and not await ledger.plans(tenant, plan_id):
            removed += await store.delete_plan(tenant, plan_id, force=True)
    for tenant, key_hash, owner in await store.scan_key_index():
        if key_hash not in keys.get((tenant, owner), ()):
            now_active = await ledger.active_keys(tenant, owner)
            if key_hash not in now_active.get((tenant, owner), ()):
                await store.drop_key_index(tenant, key_hash, owner)
                removed += 1
    tenants = {t for t, _ in plans} | {t for t, _ in held}
    for tenant in sorted(tenants):
        removed += await store.prune(tenant)
    return removed


async def apply_change(ledger: Ledger, store: RedisStore, table: str, tenant: str, target: str) -> None:
    """Apply one changed row named by a change notification (``target`` is the plan id
    for plans, the consumer id otherwise). Reads the row anew: the notification only
    says what changed, Postgres says what it is now."""
    if table == "plans":
        if not await ledger.plans(tenant, target):  # deleted in Postgres
            await store.delete_plan(tenant, target, force=True)
        for plan in await ledger.plans(tenant, target):
            await store.apply_plan(plan.plan, plan.version)
            # Consumers Redis has not bound yet (a plan created with them in SQL).
            for consumer in await ledger.consumers(tenant, plan_id=target):
                await apply_consumer(store, consumer, plan)
    elif table == "consumers":
        found = await ledger.consumers(tenant, target)
        if not found:  # deleted (or marked deleted) in Postgres
            await store.delete_consumer(tenant, target, now_ms())
            await store.publish_invalidation(tenant, target)
        for consumer in found:
            (plan,) = await ledger.plans(tenant, consumer.plan_id)
            await apply_consumer(store, consumer, plan)
            await store.apply_keys(
                tenant, target, (await ledger.active_keys(tenant, target)).get((tenant, target), {})
            )
            for wallet in await ledger.wallets(tenant, target):  # a restored consumer's
                await apply_wallet(store, wallet)
    elif table == "api_keys":
        active = await ledger.active_keys(tenant, target)
        await store.apply_keys(tenant, target, active.get((tenant, target), {}))
        await store.publish_invalidation(tenant, target)
    elif table == "wallets":
        for wallet in await ledger.wallets(tenant, target):
            await apply_wallet(store, wallet)
    else:
        log.warning("change notification for unknown table %r", table)
