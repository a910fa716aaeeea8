"""Quota crossings (issue 19): the store step that moves a window's count reports each
80/90/100% level it crossed, once per window period however many decisions race, on
every store; the decision path and the gateway event path alike."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from sidecar.core.alerts import level_count, parse_crossings, quota_crossings
from sidecar.core.windows import WINDOWS
from sidecar.store.base import Store
from tests.conftest import seed
from tests.kong.harness import fresh_minute


@pytest.mark.parametrize(
    ("limit", "level", "count"),
    [
        (100, 80, 80),
        (7, 80, 6),
        (7, 90, 7),
        (7, 100, 7),
        (1, 80, 1),
        (3, 90, 3),
        (2**53 - 1, 90, 8106479329266892),
    ],
)
def test_the_level_count_is_the_ceiling_of_the_share(limit: int, level: int, count: int) -> None:
    assert level_count(limit, level) == count == -(-limit * level // 100)


def test_an_increment_reports_every_level_it_crosses_and_no_other() -> None:
    limits = (100, None, 7, None, None)
    resets = tuple(range(1, len(WINDOWS) + 1))
    assert quota_crossings(limits, (79, None, 3, None, None), 1, resets) == ""
    assert quota_crossings(limits, (80, None, 6, None, None), 1, resets) == "minute:80:1:100,day:80:3:7"
    # One call of 25 hits from 70 to 95: 80 and 90 at once.
    crossed = parse_crossings(quota_crossings(limits, (95, None, 4, None, None), 25, resets))
    assert [(c.window, c.level) for c in crossed] == [("minute", 80), ("minute", 90)]
    assert (
        quota_crossings(limits, (100, None, 7, None, None), 1, resets)
        == "minute:100:1:100,day:90:3:7,day:100:3:7"
    )
    assert parse_crossings("minute:80:1:100,bad,day:x:3:7") == [parse_crossings("minute:80:1:100")[0]]


async def _crossings(store: Store, tenant: str, consumer_id: str) -> list[tuple[str, int, int]]:
    """(window, level, the count of the call that crossed) of the usage records."""
    found = []
    for record in await store.usage(tenant, consumer_id):
        for crossing in parse_crossings(record.crossings):
            found.append((crossing.window, crossing.level, crossing.limit))
    return found


async def test_150_racing_decisions_cross_each_level_once(client: httpx.AsyncClient, store: Store) -> None:
    await seed(client, windows={"minute": 100, "day": 1_000}, price=1, balance=10_000)
    fresh_minute()  # all 150 in one minute
    ask = {"consumer_id": "c1", "product": "api"}
    answers = await asyncio.gather(*(client.post("/v1/authorize", json=ask) for _ in range(150)))
    assert sum(a.json()["allow"] for a in answers) == 100
    records = await store.usage("default", "c1")
    assert len(records) == 100
    crossed = [(c.window, c.level) for r in records for c in parse_crossings(r.crossings)]
    assert sorted(crossed) == [("minute", 80), ("minute", 90), ("minute", 100)]
    # Each reported by the call whose count reached the level, with the window's limit and end.
    by_level = {c.level: (r, c) for r in records for c in parse_crossings(r.crossings)}
    assert {level: c.limit for level, (_, c) in by_level.items()} == {80: 100, 90: 100, 100: 100}
    ends = {c.period_end_ms for _, c in by_level.values()}
    assert len(ends) == 1 and next(iter(ends)) % 60_000 == 0
    # The day window (1,000) is far from 80%: nothing else reported.
    assert all(r.crossings == "" for r in records if r not in [r for r, _ in by_level.values()])


async def test_a_gateway_event_crossing_a_level_reports_it(client: httpx.AsyncClient, store: Store) -> None:
    await seed(client, windows={"day": 10}, price=1, balance=1_000)
    fresh_minute()
    events = [{"consumer_id": "c1", "request_id": f"ev-{i}", "product": "api"} for i in range(3)]
    events.append({"consumer_id": "c1", "request_id": "ev-big", "product": "api", "count": 7})
    for event in events:  # in order: 1, 2, 3, then 7 more (3 -> 10 crosses 80, 90, 100)
        response = await client.post("/v1/usage", json=event)
        assert response.json()["accepted"] == 1, response.text
    records = await store.usage("default", "c1")
    assert [r.hits for r in records] == [1, 1, 1, 7]
    assert [[c.level for c in parse_crossings(r.crossings)] for r in records] == [[], [], [], [80, 90, 100]]
