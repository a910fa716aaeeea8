"""The store protocol every hot store implements, and the input of one decision."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

import msgspec

from sidecar.core.access import ApiToken
from sidecar.core.models import (
    ConsumerKey,
    ConsumerSpec,
    ConsumerStatus,
    ConsumerView,
    Outcome,
    Plan,
    UsageEvent,
    UsageRecord,
)
from sidecar.core.wallet_rules import Notice


class StoreUnavailable(Exception):
    """The store could not be reached or did not answer in time. Nothing is known to
    have changed; the caller applies its fail mode."""


class StoreDown(StoreUnavailable):
    """Not even tried: the node's breaker is open after it was found down moments ago."""


class DecisionCall(msgspec.Struct, frozen=True):
    """Everything a store needs for one decision, computed by the caller.

    ``key_hash`` is set when the consumer was named by an API key: the store then
    checks the key is still registered to the consumer, atomically with the rest.
    ``idempotency_ttl_ms`` is 0 when the caller gave no request id (nobody can retry).
    ``apply_by_ms`` bounds how late a networked store may still apply the decision.
    """

    tenant: str
    consumer_id: str
    key_hash: str | None
    product: str
    operation: str
    cost: int | None
    hits: int
    request_id: str
    decision_id: str
    now_ms: int
    window_starts_ms: tuple[int, ...]
    resets_ms: tuple[int, ...]
    idempotency_ttl_ms: int
    # Past this moment (ms, store clock) the store must refuse to apply the decision:
    # the caller has given up and answered from its fail mode. 0: no limit.
    apply_by_ms: int = 0
    # The caller stops waiting at this time.monotonic(): a networked store raises
    # TimeoutError then. 0: no deadline.
    deadline: float = 0.0


class TopUpResult(msgspec.Struct, frozen=True):
    balance: int
    applied: bool  # False when the reference was already applied


class Store(Protocol):
    def decide(self, call: DecisionCall) -> asyncio.Future[Outcome]:
        """Start one atomic, all-or-nothing decision (see core.decision.evaluate); the
        future resolves to its Outcome, or fails with StoreUnavailable, or with
        TimeoutError once ``call.deadline`` has passed. Not a coroutine: a transport
        may wait for it with a callback instead of a task."""
        ...

    async def resolve_key(self, tenant: str, key_hash: str) -> str | None:
        """The consumer id an API key hash was registered to, or None."""
        ...

    async def put_plan(self, plan: Plan) -> bool:
        """Create or replace a plan; every consumer bound to it follows. True if created."""
        ...

    async def get_plan(self, tenant: str, plan_id: str) -> Plan | None: ...

    async def put_consumer(self, consumer: ConsumerSpec, now_ms: int) -> tuple[ConsumerView, bool]:
        """Create or update a consumer; raises NotFound for an unknown plan.
        Returns the view and whether it was created."""
        ...

    async def get_consumer(self, tenant: str, consumer_id: str, now_ms: int) -> ConsumerView | None: ...

    async def set_status(
        self, tenant: str, consumer_id: str, status: ConsumerStatus, now_ms: int
    ) -> ConsumerView:
        """Raises NotFound for an unknown consumer."""
        ...

    async def top_up(self, tenant: str, consumer_id: str, amount: int, reference: str | None) -> TopUpResult:
        """Credit the wallet; a repeated ``reference`` is applied once. NotFound if unknown."""
        ...

    async def add_key(self, tenant: str, consumer_id: str, key: ConsumerKey) -> None:
        """Register an API key hash to a consumer, with its expiry and scopes (a key
        registered again takes the new ones and keeps its first registration time);
        NotFound if unknown; Conflict ``key_in_use`` if another consumer holds it."""
        ...

    async def revoke_key(self, tenant: str, consumer_id: str, key_hash: str) -> bool:
        """Unregister a key hash; False if it was not registered to this consumer."""
        ...

    async def publish_invalidation(self, tenant: str, consumer_id: str, *, wait: bool = False) -> None:
        """Tell every sidecar process that this consumer (``*``: every consumer of the
        tenant) changed; with ``wait``, once they have all dropped what they remembered."""
        ...

    async def list_plans(self, tenant: str, after: str | None, limit: int) -> tuple[list[Plan], str | None]:
        """Up to ``limit`` plans of ``tenant`` with ids above ``after``, in id order, and
        the id to continue after (None: no more)."""
        ...

    async def list_consumers(
        self,
        tenant: str,
        after: str | None,
        limit: int,
        now_ms: int,
        plan_id: str | None = None,
        status: ConsumerStatus | None = None,
    ) -> tuple[list[ConsumerView], str | None]:
        """Like ``list_plans``, for consumers, filtered by plan and status."""
        ...

    async def consumer_keys(self, tenant: str, consumer_id: str) -> list[ConsumerKey] | None:
        """The consumer's registered API keys (None: no such consumer)."""
        ...

    async def delete_plan(self, tenant: str, plan_id: str, force: bool = False) -> bool:
        """Remove a plan; Conflict ``plan_in_use`` while consumers are bound to it
        (unless ``force``: the truth no longer has it). False if there was none."""
        ...

    async def delete_consumer(self, tenant: str, consumer_id: str, now_ms: int) -> bool:
        """Remove a consumer from the hot store: its next decision is
        ``unknown_consumer``, its keys stop resolving. Usage not yet drained is kept.
        False if there was none."""
        ...

    async def usage(self, tenant: str, consumer_id: str) -> list[UsageRecord]:
        """The consumer's usage records not yet drained to the ledger, oldest first."""
        ...

    async def record_events(
        self, events: Sequence[UsageEvent], dedupe_ttl_ms: int, rate: bool = True
    ) -> list[bool]:
        """Append validated gateway events; per event, True if stored, False if its
        request id was already recorded within ``dedupe_ttl_ms``. A stored event that
        no decision covered is rated: counted in the windows of its time's periods and
        charged at its plan's price, with a usage record and the wallet rules
        (core/wallet_rules.py), atomically with its storing; ``rate`` False stores only."""
        ...

    async def notices(self, tenant: str, consumer_id: str) -> list[Notice] | None:
        """The consumer's wallet notices (suspended, resumed, topup_requested) still in
        the hot store, oldest first; None: no such consumer."""
        ...

    async def events(self, tenant: str, consumer_id: str) -> list[UsageEvent]:
        """The consumer's recorded gateway events, oldest first."""
        ...

    async def put_token(self, token: ApiToken) -> None:
        """Create or replace an API token record (its last use is kept apart: see
        touch_token)."""
        ...

    async def get_token(self, token_id: str) -> ApiToken | None: ...

    async def list_tokens(self, tenant: str) -> list[ApiToken]:
        """The tenant's tokens (revoked ones too), by creation time."""
        ...

    async def touch_token(self, token_id: str, used_ms: int) -> None:
        """Note a token's last use without rewriting its record (a revocation racing
        it is never undone)."""
        ...

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers (on a cluster: every slot
        has a master and every master answers)."""
        ...

    async def close(self) -> None: ...
