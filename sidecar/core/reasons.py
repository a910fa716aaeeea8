"""Stable reason codes of a decision and the HTTP status a gateway should answer with.

These strings are a public contract (HTTP, gRPC, the Kong plugin, the Apigee flow and
billing all match on them): add new ones, never rename.
"""

from __future__ import annotations

import enum


class Reason(enum.StrEnum):
    OK = "ok"
    SUSPENDED = "suspended"
    REVOKED = "revoked"
    UNKNOWN_CONSUMER = "unknown_consumer"
    INVALID_KEY = "invalid_key"
    KEY_EXPIRED = "key_expired"
    SCOPE_DENIED = "scope_denied"
    PRODUCT_NOT_ALLOWED = "product_not_allowed"
    QUOTA_EXCEEDED = "quota_exceeded"
    INSUFFICIENT_BALANCE = "insufficient_balance"
    STORE_UNAVAILABLE = "store_unavailable"


HTTP_STATUS: dict[Reason, int] = {
    Reason.OK: 200,
    Reason.SUSPENDED: 403,
    Reason.REVOKED: 403,
    Reason.UNKNOWN_CONSUMER: 403,
    Reason.INVALID_KEY: 401,
    Reason.KEY_EXPIRED: 401,
    Reason.SCOPE_DENIED: 403,
    Reason.PRODUCT_NOT_ALLOWED: 403,
    Reason.QUOTA_EXCEEDED: 429,
    Reason.INSUFFICIENT_BALANCE: 402,
    # Only when the fail mode is "closed"; fail-open answers 200 with degraded=true.
    Reason.STORE_UNAVAILABLE: 503,
}
