"""A consumer's current period, as a customer portal shows it: for each window its plan
limits, how much is used, what remains and when it resets (UTC calendar periods:
sidecar/core/windows.py), and the wallet. Pure: the caller reads the consumer and its
plan from the store."""

from __future__ import annotations

import msgspec

from sidecar.core.clock import iso_utc
from sidecar.core.models import ConsumerView, Plan
from sidecar.core.windows import WINDOWS, window_bounds


class WindowUsage(msgspec.Struct):
    window: str  # minute, hour, day, week, month
    used: int
    limit: int
    remaining: int
    resets_at: str  # ISO 8601 UTC: when the count starts again from zero


class CurrentUsage(msgspec.Struct):
    tenant: str
    consumer_id: str
    plan_id: str
    status: str
    wallet_mode: str
    balance: int  # micros
    pending: int  # micros charged here, not yet settled in Postgres
    windows: list[WindowUsage]  # the plan's limited windows, shortest first
    as_of: str  # ISO 8601 UTC


def current_usage(view: ConsumerView, plan: Plan, now_ms: int) -> CurrentUsage:
    windows = []
    for window in WINDOWS:
        limit = plan.windows.get(window.value)
        if limit is None:
            continue
        used = view.windows.get(window.value, 0)
        _, reset_ms = window_bounds(window, now_ms)
        windows.append(WindowUsage(window.value, used, limit, max(0, limit - used), iso_utc(reset_ms) or ""))
    return CurrentUsage(
        tenant=view.tenant,
        consumer_id=view.id,
        plan_id=view.plan_id,
        status=view.status.value,
        wallet_mode=view.wallet_mode.value,
        balance=view.balance,
        pending=view.pending,
        windows=windows,
        as_of=iso_utc(now_ms) or "",
    )
