"""The wallet lifecycle rules: suspension when a prepaid wallet runs dry, resumption on
a top-up, and auto top-up requests; and how an ingested event is rated.

Written once here: the memory store runs these functions, and the Lua scripts
(``decide.lua``, ``event.lua``, ``topup.lua``, ``settle.lua``) transcribe them; the
shared store tests hold both to the same answers.

A *hold* is the wallet's own suspension (reason ``wallet_empty``). It is kept apart
from the status an admin sets, so a manual suspension and a wallet hold never undo
each other: a top-up lifts only the hold, a manual resume only the manual status.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

import msgspec

from sidecar.core.errors import InvalidInput
from sidecar.core.money import MAX_MICROS


class NoticeType(enum.StrEnum):
    """What the wallet rules record (per consumer, readable through the API)."""

    SUSPENDED = "suspended"  # held: reason wallet_empty
    RESUMED = "resumed"  # the hold lifted by a top-up
    TOPUP_REQUESTED = "topup_requested"  # the balance fell below the auto top-up threshold


WALLET_EMPTY = "wallet_empty"
CURRENCY_LEN = 3


class AutoTopup(msgspec.Struct, forbid_unknown_fields=True):
    """Ask the billing system to charge the card when the balance falls below
    ``threshold`` (micros): one ``topup_requested`` notice per crossing. The sidecar
    never charges a card; the billing system calls top-up with a reference."""

    enabled: bool = True
    threshold: int = 0
    amount: int = 0  # micros the billing system is asked to add
    currency: str = "USD"

    def validated(self) -> AutoTopup:
        for name in ("threshold", "amount"):
            if not 0 <= getattr(self, name) <= MAX_MICROS:
                raise InvalidInput(
                    f"auto_topup.{name} must be between 0 and {MAX_MICROS} micros",
                    code="invalid_amount",
                    field=f"auto_topup.{name}",
                )
        if self.enabled and self.amount == 0:
            raise InvalidInput(
                "auto_topup.amount must be above 0 when enabled",
                code="invalid_amount",
                field="auto_topup.amount",
            )
        if not (len(self.currency) == CURRENCY_LEN and self.currency.isascii() and self.currency.isupper()):
            raise InvalidInput(
                "auto_topup.currency must be an ISO 4217 code (3 capital letters)",
                field="auto_topup.currency",
            )
        return self


class Notice(msgspec.Struct, omit_defaults=True):
    """One wallet lifecycle event of a consumer."""

    id: str  # ordered per consumer (a stream id)
    type: str
    at_ms: int
    balance: int
    threshold: int | None = None
    amount: int | None = None
    currency: str | None = None


def covers(balance: int, price: int) -> bool:
    """Whether a prepaid balance pays for the next call at the plan's price."""
    return balance > 0 and balance >= price


class AfterDebit(NamedTuple):
    hold: bool  # the wallet is held from now on (reason wallet_empty)
    topup_requested: bool


def after_debit(
    before: int,
    after: int,
    *,
    price: int,
    prepaid: bool,
    suspend_at_zero: bool,
    held: bool,
    topup: AutoTopup | None,
) -> AfterDebit:
    """What a debit from ``before`` to ``after`` sets off. Both are crossings, so
    however many debits race across one, exactly one of them sets it off: the debit
    that takes a prepaid balance from paying for a call to not paying holds the wallet;
    the debit that takes it from the threshold or above to below requests a top-up."""
    hold = prepaid and suspend_at_zero and not held and covers(before, price) and not covers(after, price)
    request = topup is not None and topup.enabled and before >= topup.threshold > after
    return AfterDebit(hold, request)


def resumes(held: bool, balance: int) -> bool:
    """A credit that brings a held wallet above zero lifts the hold."""
    return held and balance > 0


class Rating(NamedTuple):
    hits: int  # counted in every limited window
    cost: int  # micros charged


def rate_event(count: int, price: int) -> Rating | None:
    """An ingested event (``count`` requests) at the plan's price per call; None when
    it is not rated: no requests, or a cost beyond exact integer money."""
    if count <= 0 or (price and count > MAX_MICROS // price):
        return None
    return Rating(count, count * price)


def shown_status(status: str, held: bool) -> tuple[str, str | None]:
    """The status and reason a consumer is shown with: a manual status wins; an active
    consumer whose wallet is held shows as suspended for ``wallet_empty``."""
    if status != "active":
        return status, "manual"
    if held:
        return "suspended", WALLET_EMPTY
    return status, None


def event_time(started_at_ms: int, now_ms: int) -> int:
    """When an ingested event is counted and recorded: when it started, or now if it
    says nothing or claims the future (a skewed clock must not fill a later window)."""
    return started_at_ms if 0 < started_at_ms <= now_ms else now_ms
