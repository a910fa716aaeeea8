"""The wall clock every part of the sidecar reads, in integer milliseconds."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from sidecar.core.errors import InvalidInput


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def iso_utc(ms: int | None) -> str | None:
    """``ms`` (epoch milliseconds) as ISO 8601 UTC, as the API shows times; None stays None."""
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC).isoformat()


MAX_LIFETIME_S = 10 * 365 * 86_400  # the longest expiry a token or an API key may be given


def check_lifetime(seconds: int | None, field: str = "expires_in_seconds") -> None:
    """An ``expires_in_seconds`` as tokens and API keys take it: None (never) or 1 s to
    10 years."""
    if seconds is not None and not 1 <= seconds <= MAX_LIFETIME_S:
        raise InvalidInput(f"{field} must be 1 to 10 years", field=field)
