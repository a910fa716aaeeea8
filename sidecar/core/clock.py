"""The wall clock every part of the sidecar reads, in integer milliseconds."""

from __future__ import annotations

import time


def now_ms() -> int:
    return time.time_ns() // 1_000_000
