"""The wall clock every part of the sidecar reads, in integer milliseconds."""

from __future__ import annotations

import time
from datetime import UTC, datetime


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def iso_utc(ms: int | None) -> str | None:
    """``ms`` (epoch milliseconds) as ISO 8601 UTC, as the API shows times; None stays None."""
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC).isoformat()
