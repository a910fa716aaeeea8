"""What decisions did around a Redis node's death: the checks the failover tests share
(cluster master, Sentinel primary)."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable

import redis
from redis.cluster import RedisCluster

from tests.decision_load import Answer

MAX_OUTAGE_S = 10.0


def check_outage(
    answers: list[Answer], hit: Iterable[str], spared: Iterable[str], killed_at: float
) -> dict[str, set[str]]:
    """No 500 anywhere; consumers ``spared`` by the outage always got real decisions;
    those ``hit`` got fail-mode answers (503, closed) only within MAX_OUTAGE_S of the
    kill, then real decisions again. Returns the request ids allowed per consumer."""
    hit, spared = set(hit), set(spared)
    bad = [a for a in answers if a.status not in (200, 503)]
    assert not bad, bad[:3]
    allowed: dict[str, set[str]] = defaultdict(set)
    degraded: list[Answer] = []
    for answer in answers:
        consumer_id = answer.body["consumer_id"]
        if answer.body["degraded"]:
            assert consumer_id in hit, f"{consumer_id}, on a live node, got a fail-mode answer"
            assert answer.body["reason"] == "store_unavailable"
            degraded.append(answer)
        else:
            assert (answer.status, answer.body["reason"]) == (200, "ok")
            allowed[consumer_id].add(answer.body["request_id"])
    assert degraded, "the outage was never seen"
    last = max(a.sent for a in degraded)
    assert min(a.sent for a in degraded) >= killed_at - 0.05
    assert last - killed_at <= MAX_OUTAGE_S, f"fail-mode answers for {last - killed_at:.1f} s"
    recovered = [a for a in answers if a.sent > last and a.body["consumer_id"] in hit]
    assert len(recovered) >= 50 and not any(a.body["degraded"] for a in recovered)
    assert spared <= allowed.keys() and hit <= allowed.keys()
    return allowed


def _days() -> set[int]:
    """Start (ms) of today and of yesterday, UTC: a test may span midnight."""
    day = 86_400_000
    today = int(time.time() * 1000) // day * day
    return {today, today - day}


def applied(client: redis.Redis | RedisCluster, prefix: str, consumer_id: str) -> tuple[list[str], int]:
    """The request ids in the consumer's usage stream and its day count."""
    tag = f"{prefix}{{default:{consumer_id}}}"
    entries = client.xrange(f"{tag}:u")
    counters = [client.get(f"{tag}:q:day:{start}") for start in _days()]
    return [fields[b"rid"].decode() for _, fields in entries], sum(int(c) for c in counters if c)


def check_applied_once(
    client: redis.Redis | RedisCluster, prefix: str, allowed: dict[str, set[str]], exact: Iterable[str]
) -> dict[str, int]:
    """Nothing applied twice: every consumer's usage stream holds each request id at
    most once and as many records as its counter counts. For the ``exact`` consumers
    (untouched by the outage) the records are exactly the allowed decisions. Returns,
    for the others, how many records differ from the allowed answers (decisions in
    flight when the node died, or lost with it: reported, never doubled)."""
    differences = {}
    exact = set(exact)
    for consumer_id, ids in allowed.items():
        records, counted = applied(client, prefix, consumer_id)
        assert len(records) == len(set(records)), f"{consumer_id}: a request applied twice"
        assert counted == len(records), f"{consumer_id}: counter {counted} != {len(records)} records"
        if consumer_id in exact:
            assert set(records) == ids
        else:
            differences[consumer_id] = len(set(records) ^ ids)
    return differences
