"""Alerts: what fires, when, and exactly once.

A quota alert fires when a window's count crosses 80, 90 or 100% of its limit. The
count only moves inside one atomic step of a store (decide.lua, event.lua, or the
memory store's decide), and that step knows the count before and after: the one step
whose increment takes the count across a level reports the crossing, however many
decisions race, on however many sidecar processes. The crossing travels with the
usage record it belongs to (field ``x`` of the usage stream) to the reconciler, which
records the alert in the same Postgres transaction as the usage row; the alert's key
(type, window, level, the period's end) makes a re-drained batch add nothing.

Wallet alerts come from the wallet rules' notices (sidecar/core/wallet_rules.py), each
keyed by its notice id.
"""

from __future__ import annotations

import enum
from collections.abc import Container, Sequence
from typing import Any

import msgspec

from sidecar.core.errors import InvalidInput
from sidecar.core.models import TENANT_RE, UsageRecord, check_id
from sidecar.core.wallet_rules import Notice
from sidecar.core.windows import WINDOWS

QUOTA_LEVELS = (80, 90, 100)  # percent of a window's limit


class AlertType(enum.StrEnum):
    """The event types of alerts, as webhooks subscribe to them."""

    QUOTA_THRESHOLD = "quota.threshold"  # a window crossed 80, 90 or 100% of its limit
    WALLET_EMPTY = "wallet.empty"  # the wallet rules held the wallet (reason wallet_empty)
    WALLET_TOPUP_REQUESTED = "wallet.topup_requested"  # below the auto top-up threshold
    WALLET_RESUMED = "wallet.resumed"  # a top-up lifted the hold
    BALANCE_LOW = "balance.low"  # a settlement took the balance below the tenant's threshold
    BALANCE_ZERO = "balance.zero"  # a settlement took the balance from above zero to zero or below
    USAGE_SPIKE = "usage.spike"  # an hour's calls above the rule's share of the trailing week's mean
    GATEWAY_ERROR_RATE = "gateway.error_rate"  # an hour's gateway errors above the rule's share
    GATEWAY_DRIFT = "gateway.drift"  # an hour's allowed calls off the gateway's count (sidecar/core/drift.py)


# What a wallet notice (NoticeType) fires.
NOTICE_ALERTS = {
    "suspended": AlertType.WALLET_EMPTY,
    "topup_requested": AlertType.WALLET_TOPUP_REQUESTED,
    "resumed": AlertType.WALLET_RESUMED,
}


def level_count(limit: int, level: int) -> int:
    """The smallest count at or above ``level`` percent of ``limit``: ceil(limit *
    level / 100), computed without a product past 2^53 (decide.lua runs the same
    arithmetic on doubles)."""
    whole, part = divmod(limit, 100)
    return level * whole + -(-level * part // 100)


def quota_crossings(
    limits: Sequence[int | None], used_after: Sequence[int | None], hits: int, resets_ms: Sequence[int]
) -> str:
    """The levels one increment of ``hits`` took each limited window across, encoded as
    the usage stream's ``x`` field: ``window:level:reset_ms:limit`` items, comma
    separated ('' when none). ``used_after`` is each window's count after the increment."""
    items = []
    for window, limit, after, reset in zip(WINDOWS, limits, used_after, resets_ms, strict=True):
        if limit is None or after is None or limit <= 0:
            continue
        for level in QUOTA_LEVELS:
            edge = level_count(limit, level)
            if after - hits < edge <= after:
                items.append(f"{window.value}:{level}:{reset}:{limit}")
    return ",".join(items)


class QuotaCrossing(msgspec.Struct, frozen=True):
    window: str
    level: int
    period_end_ms: int
    limit: int


def parse_crossings(text: str) -> list[QuotaCrossing]:
    """The ``x`` field back into crossings (malformed items are skipped: the field is
    written only by our scripts)."""
    crossings = []
    for item in filter(None, text.split(",")):
        parts = item.split(":")
        if len(parts) == 4 and all(p.isascii() and p.isdigit() for p in parts[1:]):
            crossings.append(QuotaCrossing(parts[0], int(parts[1]), int(parts[2]), int(parts[3])))
    return crossings


class NewAlert(msgspec.Struct, frozen=True):
    """An alert as the reconciler records it: unique on (tenant, consumer_id, type, key)."""

    tenant: str
    consumer_id: str
    type: AlertType
    key: str  # what makes it once (the window, level and period; a notice id)
    at_ms: int  # when it happened (the crossing decision's time)
    data: dict[str, Any]


def quota_alert(tenant: str, consumer_id: str, at_ms: int, product: str, crossing: QuotaCrossing) -> NewAlert:
    return NewAlert(
        tenant=tenant,
        consumer_id=consumer_id,
        type=AlertType.QUOTA_THRESHOLD,
        key=f"{crossing.window}:{crossing.level}:{crossing.period_end_ms}",
        at_ms=at_ms,
        data={
            "window": crossing.window,
            "level": crossing.level,
            "limit": crossing.limit,
            "threshold": level_count(crossing.limit, crossing.level),
            "period_end_ms": crossing.period_end_ms,
            "product": product,
        },
    )


def crossing_alerts(records: Sequence[UsageRecord], new: Container[str]) -> list[NewAlert]:
    """The quota alerts of the usage records whose decision id is in ``new`` (the rows a
    settlement recorded for the first time), in record order."""
    return [
        quota_alert(r.tenant, r.consumer_id, r.ts_ms, r.product, crossing)
        for r in records
        if r.crossings and r.decision_id in new
        for crossing in parse_crossings(r.crossings)
    ]


def notice_alerts(tenant: str, consumer_id: str, notices: Sequence[Notice]) -> list[NewAlert]:
    """The alerts wallet notices fire, keyed by the notice id."""
    alerts = []
    for notice in notices:
        alert_type = NOTICE_ALERTS.get(notice.type)
        if alert_type is not None:
            data = msgspec.to_builtins(notice)
            data.pop("at_ms"), data.pop("type")
            data["notice_id"] = data.pop("id")
            alerts.append(NewAlert(tenant, consumer_id, alert_type, notice.id, notice.at_ms, data))
    return alerts


def balance_alerts(
    tenant: str, consumer_id: str, before: int, after: int, at_ms: int, reference: str, low_micros: int | None
) -> list[NewAlert]:
    """The alerts of one settlement that took the settled balance from ``before`` to
    ``after`` (keyed by the settlement's batch reference: a batch settles once)."""
    alerts = []
    data = {"balance_before": before, "balance": after}
    if low_micros is not None and before >= low_micros > after:
        alerts.append(
            NewAlert(
                tenant,
                consumer_id,
                AlertType.BALANCE_LOW,
                reference,
                at_ms,
                {**data, "threshold": low_micros},
            )
        )
    if before > 0 >= after:
        alerts.append(NewAlert(tenant, consumer_id, AlertType.BALANCE_ZERO, reference, at_ms, data))
    return alerts


MAX_LOW_BALANCE = 2**53 - 1


class AlertRules(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A tenant's alert rules (PUT /v1/admin/alert-rules); a tenant without any has
    these defaults. A rule turned off records nothing and delivers nothing."""

    tenant: str = "default"
    quota_levels: list[int] = msgspec.field(default_factory=lambda: list(QUOTA_LEVELS))
    low_balance_micros: int | None = None  # None: no balance.low alert
    balance_zero: bool = True
    wallet_empty: bool = True
    wallet_topup_requested: bool = True
    wallet_resumed: bool = True
    # gateway.drift above this percentage (None: the drift_threshold_pct setting).
    drift_threshold_pct: float | None = None
    # usage.spike: an hour's allowed calls of a consumer and product above this percentage
    # of its mean hour over the 7 days before (None: off), once it has usage_spike_min_calls.
    usage_spike_pct: int | None = 200
    usage_spike_min_calls: int = 100
    # gateway.error_rate: an hour's gateway errors (5xx, and the errors of aggregated rows)
    # above this percentage of its calls (None: off), once it has error_rate_min_calls.
    error_rate_pct: float | None = 5.0
    error_rate_min_calls: int = 20

    def validated(self) -> AlertRules:
        check_id(self.tenant, TENANT_RE, "tenant")
        if any(level not in QUOTA_LEVELS for level in self.quota_levels):
            raise InvalidInput(
                f"quota_levels may hold {', '.join(map(str, QUOTA_LEVELS))} (percent of a limit)",
                field="quota_levels",
            )
        if self.low_balance_micros is not None and not 1 <= self.low_balance_micros <= MAX_LOW_BALANCE:
            raise InvalidInput(
                f"low_balance_micros must be 1 to {MAX_LOW_BALANCE} (or null: off)",
                field="low_balance_micros",
            )
        if self.drift_threshold_pct is not None and not 0 <= self.drift_threshold_pct <= 100:
            raise InvalidInput(
                "drift_threshold_pct must be 0 to 100 (null: the setting)", field="drift_threshold_pct"
            )
        if self.usage_spike_pct is not None and not 101 <= self.usage_spike_pct <= 1_000_000:
            raise InvalidInput("usage_spike_pct must be 101 to 1000000 (null: off)", field="usage_spike_pct")
        if self.error_rate_pct is not None and not 0 < self.error_rate_pct < 100:
            raise InvalidInput(
                "error_rate_pct must be above 0 and below 100 (null: off)", field="error_rate_pct"
            )
        for name in ("usage_spike_min_calls", "error_rate_min_calls"):
            if not 1 <= getattr(self, name) <= MAX_LOW_BALANCE:
                raise InvalidInput(f"{name} must be 1 to {MAX_LOW_BALANCE}", field=name)
        self.quota_levels = sorted(set(self.quota_levels))
        return self

    def fires(self, alert: NewAlert) -> bool:
        if alert.type is AlertType.QUOTA_THRESHOLD:
            return alert.data["level"] in self.quota_levels
        return {
            AlertType.WALLET_EMPTY: self.wallet_empty,
            AlertType.WALLET_TOPUP_REQUESTED: self.wallet_topup_requested,
            AlertType.WALLET_RESUMED: self.wallet_resumed,
            AlertType.BALANCE_ZERO: self.balance_zero,
            AlertType.BALANCE_LOW: self.low_balance_micros is not None,
        }.get(alert.type, True)


BASELINE_HOURS = 7 * 24  # the trailing week a usage spike is measured against


def spike_alert(
    tenant: str, consumer_id: str, product: str, hour_ms: int, calls: int, week_calls: int, rules: AlertRules
) -> NewAlert | None:
    """usage.spike of one consumer, product and hour: ``calls`` in the hour against
    ``week_calls`` in the BASELINE_HOURS before it (a mean hour of week_calls / 168;
    compared in integers). No history, no spike: a first hour is not one."""
    pct = rules.usage_spike_pct
    if pct is None or calls < rules.usage_spike_min_calls or week_calls <= 0:
        return None
    if calls * 100 * BASELINE_HOURS <= pct * week_calls:
        return None
    mean = week_calls / BASELINE_HOURS
    data = {"product": product, "hour_ms": hour_ms, "calls": calls, "baseline_per_hour": round(mean, 2),
            "threshold_pct": pct, "pct": round(calls * 100 / mean, 1)}  # fmt: skip
    return NewAlert(tenant, consumer_id, AlertType.USAGE_SPIKE, f"{product}:{hour_ms}", hour_ms, data)


def error_rate_alert(
    tenant: str, consumer_id: str, product: str, hour_ms: int, calls: int, errors: int, rules: AlertRules
) -> NewAlert | None:
    """gateway.error_rate of one consumer, product and hour."""
    pct = rules.error_rate_pct
    if pct is None or calls < rules.error_rate_min_calls or errors * 100 <= pct * calls:
        return None
    data = {"product": product, "hour_ms": hour_ms, "calls": calls, "errors": errors,
            "error_rate_pct": round(errors * 100 / calls, 2), "threshold_pct": pct}  # fmt: skip
    return NewAlert(tenant, consumer_id, AlertType.GATEWAY_ERROR_RATE, f"{product}:{hour_ms}", hour_ms, data)
