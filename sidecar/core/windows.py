"""Calendar-aligned UTC fixed windows.

A window is identified by the epoch millisecond at which it starts; it ends (resets) at
the start of the next one. Weeks start on Monday 00:00 UTC (ISO 8601); months follow
the calendar, so they last 28 to 31 days.
"""

from __future__ import annotations

import enum
import functools
from datetime import UTC, datetime
from typing import NamedTuple

MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS
WEEK_MS = 7 * DAY_MS
# 1970-01-01 was a Thursday; the first Monday at or before it is 1969-12-29.
_EPOCH_WEEKDAY = 3  # Monday == 0


class Window(enum.StrEnum):
    MINUTE = "minute"
    HOUR = "hour"
    DAY = "day"
    WEEK = "week"
    MONTH = "month"


# Fixed order shared by both stores and the Lua script: index i of every per-window array.
WINDOWS: tuple[Window, ...] = (
    Window.MINUTE,
    Window.HOUR,
    Window.DAY,
    Window.WEEK,
    Window.MONTH,
)


def _month_start_ms(year: int, month: int) -> int:
    return int(datetime(year, month, 1, tzinfo=UTC).timestamp()) * 1000


def window_bounds(window: Window, now_ms: int) -> tuple[int, int]:
    """Return ``(start_ms, reset_ms)`` of the window of this kind that holds ``now_ms``."""
    if window is Window.MINUTE:
        start = now_ms - now_ms % MINUTE_MS
        return start, start + MINUTE_MS
    if window is Window.HOUR:
        start = now_ms - now_ms % HOUR_MS
        return start, start + HOUR_MS
    if window is Window.DAY:
        start = now_ms - now_ms % DAY_MS
        return start, start + DAY_MS
    if window is Window.WEEK:
        day_index = now_ms // DAY_MS
        start = (day_index - (day_index + _EPOCH_WEEKDAY) % 7) * DAY_MS
        return start, start + WEEK_MS
    moment = datetime.fromtimestamp(now_ms // 1000, tz=UTC)
    start = _month_start_ms(moment.year, moment.month)
    if moment.month == 12:
        reset = _month_start_ms(moment.year + 1, 1)
    else:
        reset = _month_start_ms(moment.year, moment.month + 1)
    return start, reset


def all_bounds(now_ms: int) -> tuple[tuple[int, int], ...]:
    """Bounds of every window kind at ``now_ms``, in ``WINDOWS`` order."""
    return tuple(window_bounds(w, now_ms) for w in WINDOWS)


class Periods(NamedTuple):
    """The current period of every window kind: starts and resets, WINDOWS order."""

    starts: tuple[int, ...]
    resets: tuple[int, ...]


@functools.lru_cache(maxsize=8)
def _periods_of_minute(minute: int) -> Periods:
    bounds = all_bounds(minute * MINUTE_MS)
    return Periods(tuple(start for start, _ in bounds), tuple(reset for _, reset in bounds))


def periods(now_ms: int) -> Periods:
    """``all_bounds`` split into starts and resets. Every window kind begins on a
    minute boundary, so the answer is the same for a whole minute and is cached."""
    return _periods_of_minute(now_ms // MINUTE_MS)


def parse_window(name: str) -> Window:
    """Map a window name to a ``Window``; raises ``ValueError`` naming the valid ones."""
    try:
        return Window(name)
    except ValueError:
        valid = ", ".join(w.value for w in WINDOWS)
        raise ValueError(f"unknown window {name!r}; expected one of: {valid}") from None
