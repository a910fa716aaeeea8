"""Calendar-aligned UTC windows: edges of day, week (Monday) and month (28-31 days)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from sidecar.core.windows import WINDOWS, Window, all_bounds, parse_window, window_bounds


def ms(text: str) -> int:
    """Epoch ms of an ISO UTC timestamp with milliseconds."""
    moment = datetime.fromisoformat(text).replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def test_last_and_first_millisecond_of_a_day_are_in_different_windows():
    before = window_bounds(Window.DAY, ms("2026-11-23T23:59:59.999"))
    after = window_bounds(Window.DAY, ms("2026-11-24T00:00:00.000"))
    assert before == (ms("2026-11-23T00:00:00.000"), ms("2026-11-24T00:00:00.000"))
    assert after == (ms("2026-11-24T00:00:00.000"), ms("2026-11-25T00:00:00.000"))
    assert before[1] == after[0]


@pytest.mark.parametrize(
    ("moment", "monday"),
    [
        ("2026-11-23T00:00:00.000", "2026-11-23"),  # a Monday is its own week start
        ("2026-11-29T23:59:59.999", "2026-11-23"),  # Sunday night still that week
        ("2026-11-30T00:00:00.000", "2026-11-30"),  # next Monday starts the next one
        ("2026-01-01T12:00:00.000", "2025-12-29"),  # a week crossing the new year
        ("1970-01-01T00:00:00.000", "1969-12-29"),  # the epoch was a Thursday
    ],
)
def test_weeks_start_monday_utc(moment: str, monday: str):
    start, reset = window_bounds(Window.WEEK, ms(moment))
    assert start == ms(f"{monday}T00:00:00.000")
    assert datetime.fromtimestamp(start / 1000, tz=UTC).weekday() == 0
    assert reset - start == 7 * 86_400_000


@pytest.mark.parametrize(
    ("moment", "start", "reset", "days"),
    [
        ("2026-02-14T10:00:00.000", "2026-02-01", "2026-03-01", 28),
        ("2028-02-29T23:59:59.999", "2028-02-01", "2028-03-01", 29),  # leap year
        ("2026-04-30T23:59:59.999", "2026-04-01", "2026-05-01", 30),
        ("2026-01-31T00:00:00.000", "2026-01-01", "2026-02-01", 31),
        ("2026-12-31T23:59:59.999", "2026-12-01", "2027-01-01", 31),  # year rollover
    ],
)
def test_months_follow_the_calendar(moment: str, start: str, reset: str, days: int):
    bounds = window_bounds(Window.MONTH, ms(moment))
    assert bounds == (ms(f"{start}T00:00:00.000"), ms(f"{reset}T00:00:00.000"))
    assert bounds[1] - bounds[0] == days * 86_400_000


def test_first_millisecond_of_a_month_opens_a_new_window():
    last = window_bounds(Window.MONTH, ms("2026-02-28T23:59:59.999"))
    first = window_bounds(Window.MONTH, ms("2026-03-01T00:00:00.000"))
    assert last[1] == first[0] == ms("2026-03-01T00:00:00.000")


def test_minute_and_hour_edges():
    assert window_bounds(Window.MINUTE, ms("2026-11-23T10:15:59.999")) == (
        ms("2026-11-23T10:15:00.000"),
        ms("2026-11-23T10:16:00.000"),
    )
    assert window_bounds(Window.HOUR, ms("2026-11-23T10:00:00.000")) == (
        ms("2026-11-23T10:00:00.000"),
        ms("2026-11-23T11:00:00.000"),
    )


def test_all_bounds_follow_the_fixed_window_order():
    now = ms("2026-11-23T10:15:30.500")
    assert all_bounds(now) == tuple(window_bounds(w, now) for w in WINDOWS)
    assert [w.value for w in WINDOWS] == ["minute", "hour", "day", "week", "month"]


def test_unknown_window_name_is_refused_with_the_valid_names():
    assert parse_window("week") is Window.WEEK
    with pytest.raises(ValueError, match="minute, hour, day, week, month"):
        parse_window("fortnight")
