"""Drift against the gateway: what this sidecar allowed against what the gateway counted,
per consumer, product and hour (no I/O; sidecar/reconciler/gateway_drift.py queries).

The gateway's count of an hour is what it let through:
- a per-request event (a status 100-599): counted when a decision of ours allowed it
  (it carries a decision id) or its status is not one a denial of ours answers (401,
  402, 403, 429, 503): a call the gateway passed without asking (fail open, a route
  without the plugin) is drift, a call we denied is not;
- an aggregated row without a status (Apigee analytics): its requests minus its errors
  (the denials of the aforo-authorize flow are errors there).
Our count is the hits of the ledger's allowed decisions (not the rows rated from the
gateway's own events, which match the gateway by construction).

drift_pct = |gateway - allowed| / gateway x 100 (100 when the gateway counted none and
we allowed some); a row is flagged when it is above the threshold.
"""

from __future__ import annotations

import msgspec

from sidecar.core.alerts import AlertType, NewAlert

DENIAL_STATUSES = (401, 402, 403, 429, 503)


class DriftRow(msgspec.Struct):
    tenant: str
    consumer_id: str
    product: str
    hour: str  # ISO 8601 UTC start of the hour
    hour_ms: int
    allowed: int  # hits of the decisions this sidecar allowed
    gateway: int  # calls the gateway let through
    drift: int  # gateway - allowed
    drift_pct: float
    flagged: bool


def drift_pct(allowed: int, gateway: int) -> float:
    if gateway == 0:
        return 100.0 if allowed else 0.0
    return round(abs(gateway - allowed) * 100 / gateway, 4)


def is_flagged(allowed: int, gateway: int, threshold_pct: float) -> bool:
    """Above the threshold, compared without rounding."""
    if gateway == 0:
        return allowed > 0
    return abs(gateway - allowed) * 100 > threshold_pct * gateway


def drift_alert(row: DriftRow, threshold_pct: float) -> NewAlert:
    """One alert per consumer, product and hour, however often the hour is compared."""
    return NewAlert(
        tenant=row.tenant,
        consumer_id=row.consumer_id,
        type=AlertType.GATEWAY_DRIFT,
        key=f"{row.product}:{row.hour_ms}",
        at_ms=row.hour_ms,
        data={
            "product": row.product,
            "hour": row.hour,
            "allowed": row.allowed,
            "gateway": row.gateway,
            "drift_pct": row.drift_pct,
            "threshold_pct": threshold_pct,
        },
    )
