"""The decision rule and how an outcome is presented to the gateway.

``evaluate`` is the rule itself, written once in Python: the memory store runs it as
is, and ``store/lua/decide.lua`` is its transcription for Redis (the shared store test
suite holds the two to the same answers).
"""

from __future__ import annotations

import itertools
import os
import secrets
from collections.abc import Sequence
from typing import NamedTuple

import msgspec

from sidecar.core.models import ConsumerState, ConsumerStatus, Decision, Outcome, WalletMode, WindowStatus
from sidecar.core.reasons import HTTP_STATUS, Reason
from sidecar.core.windows import WINDOWS


class DecisionPolicy(msgspec.Struct, frozen=True):
    """How long a gateway may reuse a decision (``ttl_seconds``).

    An allow is never reusable: every allowed call must be counted and charged. A
    denial may be reused while it cannot change: until the window resets for a quota
    denial (capped, since an operator may raise the limit), ``deny_ttl_seconds`` for
    the others (a resume or a top-up can lift them at any moment).
    """

    deny_ttl_seconds: int = 5
    quota_ttl_cap_seconds: int = 60


class Verdict(NamedTuple):
    reason: Reason
    charged: int
    retry_at_ms: int


def evaluate(
    state: ConsumerState | None,
    *,
    key_refusal: Reason | None,
    product: str,
    cost: int | None,
    hits: int,
    used: Sequence[int],
    resets_ms: Sequence[int],
) -> Verdict:
    """Decide one call. ``used`` is each window's count before the call (WINDOWS order).

    ``key_refusal`` is None for a consumer named by id or by a key that may make this
    call, else why the key may not (``invalid_key``: not registered to the consumer;
    ``key_expired``, ``scope_denied``: sidecar/core/api_keys.py:key_refusal).

    All-or-nothing: the caller applies the increments (``hits`` on every limited window)
    and the debit (``charged``) only when the reason is ``ok``.
    """
    if state is None:
        # A key that names no consumer (deleted, or never there) is an invalid key.
        return Verdict(Reason.UNKNOWN_CONSUMER if key_refusal is None else Reason.INVALID_KEY, 0, 0)
    if key_refusal is not None:
        return Verdict(key_refusal, 0, 0)
    if state.status is ConsumerStatus.SUSPENDED:
        return Verdict(Reason.SUSPENDED, 0, 0)
    if state.status is ConsumerStatus.REVOKED:
        return Verdict(Reason.REVOKED, 0, 0)
    if state.held:
        # Held by the wallet rules (wallet_empty) until a top-up: the caller is told to pay.
        return Verdict(Reason.INSUFFICIENT_BALANCE, 0, 0)
    if state.products and product not in state.products:
        return Verdict(Reason.PRODUCT_NOT_ALLOWED, 0, 0)
    retry_at = 0
    for limit, count, reset in zip(state.limits, used, resets_ms, strict=True):
        # A denied call may only succeed once every exhausted window has reset.
        if limit is not None and count + hits > limit:
            retry_at = max(retry_at, reset)
    if retry_at:
        return Verdict(Reason.QUOTA_EXCEEDED, 0, retry_at)
    charge = state.price if cost is None else cost
    if state.wallet_mode is WalletMode.PREPAID and state.balance < charge:
        return Verdict(Reason.INSUFFICIENT_BALANCE, 0, 0)
    return Verdict(Reason.OK, charge, 0)


class _IdSource:
    """Decision ids: 12 hex digits of milliseconds, 8 of a random per-process prefix
    and 8 of a counter. Unique without a random draw per decision; a forked child
    draws its own prefix."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.prefix = secrets.token_hex(4)
        self.counter = itertools.count(secrets.randbelow(2**32))

    def next(self, now_ms: int) -> str:
        return f"{now_ms:012x}{self.prefix}{next(self.counter) & 0xFFFFFFFF:08x}"


_ids = _IdSource()
os.register_at_fork(after_in_child=_ids.reset)


def new_decision_id(now_ms: int) -> str:
    """A time-ordered id, unique across processes (see _IdSource)."""
    return _ids.next(now_ms)


# Lookups by value: calling the Enum costs more than the rest of ``present``.
_REASONS = {reason.value: reason for reason in Reason}
_WINDOW_NAMES = tuple(window.value for window in WINDOWS)


def present(
    outcome: Outcome,
    *,
    tenant: str,
    consumer_id: str | None,
    product: str,
    request_id: str,
    now_ms: int,
    resets_ms: Sequence[int],
    policy: DecisionPolicy,
) -> Decision:
    """Turn a store's outcome into the decision the gateway receives."""
    reason = _REASONS.get(outcome.reason) or Reason(outcome.reason)
    retry_after: int | None = None
    if reason is Reason.OK:
        ttl = 0
    elif reason is Reason.QUOTA_EXCEEDED:
        retry_after = max(1, -(-(outcome.retry_at_ms - now_ms) // 1000))
        ttl = min(retry_after, policy.quota_ttl_cap_seconds)
    else:
        ttl = policy.deny_ttl_seconds
    # Positional: this runs once per decision.
    windows = [
        WindowStatus(name, limit, max(0, limit - (used or 0)), reset // 1000)
        for name, limit, used, reset in zip(
            _WINDOW_NAMES, outcome.limits, outcome.used, resets_ms, strict=True
        )
        if limit is not None
    ]
    return Decision(
        allow=reason is Reason.OK,
        reason=reason.value,
        status=HTTP_STATUS[reason],
        decision_id=outcome.decision_id,
        request_id=request_id,
        tenant=tenant,
        consumer_id=consumer_id,
        product=product,
        ttl_seconds=ttl,
        retry_after=retry_after,
        windows=windows,
        balance=outcome.balance,
        charged=outcome.charged,
        replayed=outcome.replayed,
    )


def unavailable(
    *,
    fail_open: bool,
    tenant: str,
    consumer_id: str | None,
    product: str,
    request_id: str,
    decision_id: str,
) -> Decision:
    """The decision when the store cannot be reached in time, per the fail mode."""
    return Decision(
        allow=fail_open,
        reason=Reason.STORE_UNAVAILABLE.value,
        status=200 if fail_open else HTTP_STATUS[Reason.STORE_UNAVAILABLE],
        decision_id=decision_id,
        request_id=request_id,
        tenant=tenant,
        consumer_id=consumer_id,
        product=product,
        ttl_seconds=0,
        retry_after=None if fail_open else 1,
        windows=[],
        balance=None,
        charged=0,
        degraded=True,
    )
