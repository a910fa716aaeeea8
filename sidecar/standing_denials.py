"""Denials that stand until a known event, remembered in this process, so a client
hammering a suspended consumer or an exhausted window costs no Redis round trip.

What stands (learnt from an answer Redis made, for a consumer named by id):

- ``suspended``, ``revoked``, ``unknown_consumer``: until an admin change of that
  consumer (the invalidation channel: status, plan binding, creation, deletion);
- ``quota_exceeded`` with a window used to its limit (no call of any size fits): until
  that window resets, for that product (a product outside the plan is refused earlier,
  with another reason), or until a change of the consumer or of its tenant's plans.

Never an allow: only denials are remembered, and an allow only ever comes from Redis.
Not remembered: ``insufficient_balance`` (it depends on the cost asked and on top-ups and
settlements, which publish no invalidation), ``product_not_allowed`` and anything asked
by API key or with a request id (a request id allowed before a suspension must replay
its allow, which only Redis knows).

The memory is usable only while this process's invalidation subscription is up
(``live``): it is emptied whenever the subscription is (re)made, since messages may have
been missed meanwhile.
"""

from __future__ import annotations

from typing import NamedTuple

from sidecar.core.models import Outcome

STANDING = frozenset({"suspended", "revoked", "unknown_consumer"})
QUOTA = "quota_exceeded"
ALL_CONSUMERS = "*"  # an invalidation naming every consumer of a tenant (a plan changed)


class _Entry(NamedTuple):
    outcome: Outcome
    product: str | None  # None: any product
    until_ms: int | None  # None: until invalidated


class StandingDenials:
    def __init__(self, max_entries: int = 100_000) -> None:
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._max = max_entries
        self.live = False

    def recall(self, tenant: str, consumer_id: str, product: str, now_ms: int) -> Outcome | None:
        """The standing denial of this consumer for this product now, if any."""
        if not self.live:
            return None
        entry = self._entries.get((tenant, consumer_id))
        if entry is None:
            return None
        if entry.until_ms is not None and now_ms >= entry.until_ms:
            del self._entries[(tenant, consumer_id)]
            return None
        if entry.product is not None and entry.product != product:
            return None
        return entry.outcome

    def learn(
        self, tenant: str, consumer_id: str, product: str, outcome: Outcome, resets_ms: tuple[int, ...]
    ) -> None:
        """Remember ``outcome`` (an answer Redis just made) if it stands."""
        if not self.live or outcome.replayed:
            return
        if outcome.reason in STANDING:
            entry = _Entry(outcome, None, None)
        elif outcome.reason == QUOTA:
            full = [
                reset
                for limit, used, reset in zip(outcome.limits, outcome.used, resets_ms, strict=True)
                if limit is not None and used is not None and used >= limit
            ]
            if not full:
                return  # a smaller call might still fit
            entry = _Entry(outcome, product, min(full))
        else:
            return
        if len(self._entries) >= self._max:
            self._entries.clear()  # a flood of distinct consumers: start over, bounded
        self._entries[(tenant, consumer_id)] = entry

    def forget(self, tenant: str, consumer_id: str) -> None:
        """An admin change of this consumer (``ALL_CONSUMERS``: of every one of the
        tenant's)."""
        if consumer_id == ALL_CONSUMERS:
            for key in [k for k in self._entries if k[0] == tenant]:
                del self._entries[key]
        else:
            self._entries.pop((tenant, consumer_id), None)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
