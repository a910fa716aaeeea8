"""The admin write path: plans, consumers, wallets, keys, suspension.

Without Postgres the hot store is all there is (StoreCatalog). With Postgres, the
PostgresCatalog (sidecar/reconciler/catalog.py) writes the truth first, audited, and
then brings the hot store in step. The HTTP admin API only knows this protocol.
"""

from __future__ import annotations

from typing import Protocol

import msgspec

from sidecar.core.access import ApiToken
from sidecar.core.clock import now_ms
from sidecar.core.models import ConsumerKey, ConsumerSpec, ConsumerStatus, ConsumerView, Plan
from sidecar.core.wallet_rules import Notice
from sidecar.standing_denials import ALL_CONSUMERS
from sidecar.store.base import Store, TopUpResult


class NeedsPostgres(Exception):
    """The operation exists only when Postgres is configured."""


class TruthUnavailable(Exception):
    """Postgres could not be reached: nothing was changed (the truth is written first)."""


class Catalog(Protocol):
    async def put_plan(self, plan: Plan, actor: str) -> bool:
        """Create or replace a plan; True if created."""
        ...

    async def put_consumer(self, spec: ConsumerSpec, actor: str) -> tuple[ConsumerView, bool]: ...

    async def set_status(
        self, tenant: str, consumer_id: str, status: ConsumerStatus, actor: str
    ) -> ConsumerView: ...

    async def top_up(
        self, tenant: str, consumer_id: str, amount: int, reference: str | None, actor: str
    ) -> TopUpResult: ...

    async def add_key(self, tenant: str, consumer_id: str, key: ConsumerKey, actor: str) -> None:
        """Register ``key`` (its ``created_ms`` is set here) to the consumer."""
        ...

    async def revoke_key(self, tenant: str, consumer_id: str, key_hash: str, actor: str) -> bool: ...

    async def delete_plan(self, tenant: str, plan_id: str, actor: str) -> bool:
        """Delete a plan no consumer is bound to (Conflict plan_in_use otherwise);
        False if there was none."""
        ...

    async def delete_consumer(self, tenant: str, consumer_id: str, actor: str) -> bool:
        """Delete a consumer: it stops deciding at once, its keys stop resolving;
        False if there was none."""
        ...

    async def consumer_keys(self, tenant: str, consumer_id: str) -> list[ConsumerKey] | None: ...

    async def notices(self, tenant: str, consumer_id: str) -> list[Notice] | None:
        """The consumer's wallet notices, oldest first; None: no such consumer."""
        ...

    async def reconciliation(self, tenant: str | None = None) -> object:
        """The reconciliation report (of ``tenant``'s consumers; None: every tenant);
        raises NeedsPostgres without Postgres."""
        ...

    async def put_token(self, token: ApiToken, action: str, actor: str) -> None:
        """Create or replace an API token (``action``: token.create / revoke / rotate, for
        the audit log)."""
        ...

    async def get_token(self, token_id: str) -> ApiToken | None: ...

    async def list_tokens(self, tenant: str) -> list[ApiToken]: ...

    async def touch_token(self, token_id: str, used_ms: int) -> None: ...


class StoreCatalog:
    """The embedded behaviour: the hot store is the only state (no audit trail)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    # Every change a process may remember a denial of is published, and waited for: the
    # caller's next decision, in any process, sees it.

    async def put_plan(self, plan: Plan, actor: str) -> bool:
        created = await self.store.put_plan(plan)
        await self.store.publish_invalidation(plan.tenant, ALL_CONSUMERS, wait=True)
        return created

    async def put_consumer(self, spec: ConsumerSpec, actor: str) -> tuple[ConsumerView, bool]:
        answer = await self.store.put_consumer(spec, now_ms())
        await self.store.publish_invalidation(spec.tenant, spec.id, wait=True)
        return answer

    async def set_status(
        self, tenant: str, consumer_id: str, status: ConsumerStatus, actor: str
    ) -> ConsumerView:
        view = await self.store.set_status(tenant, consumer_id, status, now_ms())
        await self.store.publish_invalidation(tenant, consumer_id, wait=True)
        return view

    async def top_up(
        self, tenant: str, consumer_id: str, amount: int, reference: str | None, actor: str
    ) -> TopUpResult:
        return await self.store.top_up(tenant, consumer_id, amount, reference)

    async def add_key(self, tenant: str, consumer_id: str, key: ConsumerKey, actor: str) -> None:
        await self.store.add_key(tenant, consumer_id, msgspec.structs.replace(key, created_ms=now_ms()))

    async def revoke_key(self, tenant: str, consumer_id: str, key_hash: str, actor: str) -> bool:
        revoked = await self.store.revoke_key(tenant, consumer_id, key_hash)
        await self.store.publish_invalidation(tenant, consumer_id, wait=True)
        return revoked

    async def delete_plan(self, tenant: str, plan_id: str, actor: str) -> bool:
        return await self.store.delete_plan(tenant, plan_id)

    async def delete_consumer(self, tenant: str, consumer_id: str, actor: str) -> bool:
        deleted = await self.store.delete_consumer(tenant, consumer_id, now_ms())
        await self.store.publish_invalidation(tenant, consumer_id, wait=True)
        return deleted

    async def consumer_keys(self, tenant: str, consumer_id: str) -> list[ConsumerKey] | None:
        return await self.store.consumer_keys(tenant, consumer_id)

    async def notices(self, tenant: str, consumer_id: str) -> list[Notice] | None:
        return await self.store.notices(tenant, consumer_id)

    async def put_token(self, token: ApiToken, action: str, actor: str) -> None:
        await self.store.put_token(token)

    async def get_token(self, token_id: str) -> ApiToken | None:
        return await self.store.get_token(token_id)

    async def list_tokens(self, tenant: str) -> list[ApiToken]:
        return await self.store.list_tokens(tenant)

    async def touch_token(self, token_id: str, used_ms: int) -> None:
        await self.store.touch_token(token_id, used_ms)

    async def reconciliation(self, tenant: str | None = None) -> object:
        raise NeedsPostgres("the reconciliation report compares Redis with Postgres: set AFORO_DATABASE_URL")
