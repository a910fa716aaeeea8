"""The hot path on a real Redis Cluster: slots computed as Redis computes them, the
slot table as the cluster reports it, and decisions that follow a slot being migrated
(MOVED, ASK, TRYAGAIN) and are counted exactly once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from sidecar.core.clock import now_ms
from sidecar.core.models import ConsumerSpec, Plan
from sidecar.store.base import StoreUnavailable
from sidecar.store.redis_store import RedisStore
from sidecar.store.resp import PipelinedConnection, encode_command
from sidecar.store.slots import (
    SLOTS,
    SlotRange,
    key_slot,
    owners,
    ranges_from_shards,
    ranges_from_slots,
    uncovered,
)
from sidecar.store.target import parse_redis_target
from tests.redis_servers import RedisClusterServers, RedisServer, running
from tests.test_redis_store import decision_call


@pytest.fixture(scope="module")
def moving_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    """A cluster of this module's own: its tests move slots around."""
    with running(RedisClusterServers(str(tmp_path_factory.mktemp("moving-cluster")))) as servers:
        yield servers


@pytest.mark.parametrize(
    "key",
    [
        "plain",
        "aforo:{default:c1}:c",
        "aforo:{default:c1}:q:minute:1700000000000",
        "aforo:plan:{acme}:gold:m",
        "aforo:key:acme:0123abcd",
        "{}empty-tag",
        "a{}{b}",
        "x{unclosed",
        "{a}{b}",
        "ünïcode:{tënant:c}",
    ],
)
def test_key_slots_are_the_ones_redis_computes(redis_cluster, key):
    node = redis_cluster.servers[0].client()
    assert key_slot(key) == node.execute_command("CLUSTER", "KEYSLOT", key)


async def test_the_slot_table_reads_alike_from_shards_and_slots(redis_cluster):
    target = parse_redis_target(redis_cluster.url)
    node = PipelinedConnection(target, target.hosts[0], connect_timeout_s=1.0)
    try:
        shards = ranges_from_shards(
            await node.execute(encode_command(["CLUSTER", "SHARDS"])), target.hosts[0]
        )
        slots = ranges_from_slots(await node.execute(encode_command(["CLUSTER", "SLOTS"])), target.hosts[0])
    finally:
        node.close()
    assert shards == slots
    assert uncovered(shards) == []
    masters = {r.master[1] for r in shards}
    assert masters == {s.port for s in redis_cluster.masters()}
    table = owners(shards)
    assert len(table) == SLOTS and None not in table


def test_slots_without_a_healthy_master_are_reported_as_gaps():
    ranges = [
        SlotRange(0, 99, ("a", 1)),
        SlotRange(100, 199, ("b", 2), healthy=False),
        SlotRange(300, SLOTS - 1, ("c", 3)),
    ]
    assert uncovered(ranges) == [(100, 299)]
    assert owners(ranges)[150] == ("b", 2) and owners(ranges)[250] is None


async def _store_on(cluster: RedisClusterServers, prefix: str, consumer_id: str, limit: int) -> RedisStore:
    store = RedisStore(cluster.url, prefix=prefix)
    await store.load_scripts()
    await store.put_plan(Plan(id="p", windows={"day": limit}).validated())
    await store.put_consumer(ConsumerSpec(id=consumer_id, plan_id="p").validated(), now_ms())
    return store


class Migration:
    """One consumer's slot moving from its master to another, step by step."""

    def __init__(self, cluster: RedisClusterServers, store: RedisStore, consumer_id: str) -> None:
        self.cluster = cluster
        self.consumer_key = store.keys.consumer("default", consumer_id)
        self.slot = key_slot(self.consumer_key)
        self.source: RedisServer = cluster.master_of(self.consumer_key)
        self.target = next(m for m in cluster.masters() if m.port != self.source.port)

    def begin(self, keys: int = 0) -> None:
        """IMPORTING / MIGRATING, and ``keys`` of the slot's keys moved (split)."""
        self.cluster.begin_migration(self.slot, self.target)
        if keys:
            assert self.cluster.migrate_keys(self.slot, self.source, self.target, count=keys) == keys

    def finish(self) -> None:
        """The rest of the keys moved, and the slot assigned to the target."""
        while self.cluster.migrate_keys(self.slot, self.source, self.target):
            pass
        self.cluster.finish_migration(self.slot, self.target)


async def test_a_decision_sent_to_the_old_master_follows_moved_and_counts_once(moving_cluster, prefix):
    store = await _store_on(moving_cluster, prefix, "mover", limit=100)
    try:
        assert (await store.decide(decision_call(consumer_id="mover", request_id="m-1"))).reason == "ok"
        migration = Migration(moving_cluster, store, "mover")
        migration.begin()
        migration.finish()
        # The store still routes the slot to the old master: MOVED, then the new one.
        second = await store.decide(decision_call(consumer_id="mover", request_id="m-2"))
        assert (second.reason, second.used[2]) == ("ok", 2)
        view = await store.get_consumer("default", "mover", now_ms())
        assert view is not None and view.windows == {"day": 2}
        assert [r.request_id for r in await store.usage("default", "mover")] == ["m-1", "m-2"]
        assert moving_cluster.master_of(migration.consumer_key).port == migration.target.port
    finally:
        await store.close()


async def test_decisions_wait_out_a_slot_in_migration_and_count_once(moving_cluster, prefix):
    """While a slot's keys are split between two masters, the source answers ASK and
    the target TRYAGAIN (a multi-key script needs all its keys on one node): decisions
    are sent again until the migration ends, none is lost, none counted twice."""
    store = await _store_on(moving_cluster, prefix, "split", limit=1000)
    try:
        assert (await store.decide(decision_call(consumer_id="split", request_id="s-0"))).reason == "ok"
        migration = Migration(moving_cluster, store, "split")
        migration.begin(keys=1)  # the consumer's keys now split between two masters
        deadline = time.monotonic() + 10
        waiting = [
            store.decide(decision_call(consumer_id="split", request_id=f"s-{i}", deadline=deadline))
            for i in range(1, 41)
        ]
        await asyncio.sleep(0.3)
        assert not any(f.done() for f in waiting), "a decision ran while the keys were split"
        migration.finish()
        outcomes = await asyncio.gather(*waiting)
        assert all(o.reason == "ok" for o in outcomes)
        assert sorted(o.used[2] for o in outcomes) == list(range(2, 42))
        view = await store.get_consumer("default", "split", now_ms())
        assert view is not None and view.windows == {"day": 41}
        assert len(await store.usage("default", "split")) == 41
    finally:
        await store.close()


async def test_a_decision_past_its_deadline_during_a_migration_applies_nothing(moving_cluster, prefix):
    store = await _store_on(moving_cluster, prefix, "late", limit=1000)
    try:
        assert (await store.decide(decision_call(consumer_id="late", request_id="l-0"))).reason == "ok"
        migration = Migration(moving_cluster, store, "late")
        migration.begin(keys=1)
        with pytest.raises((TimeoutError, StoreUnavailable)):
            await store.decide(
                decision_call(consumer_id="late", request_id="l-1", deadline=time.monotonic() + 0.1)
            )
        migration.finish()
        view = await store.get_consumer("default", "late", now_ms())
        assert view is not None and view.windows == {"day": 1}
        assert [r.request_id for r in await store.usage("default", "late")] == ["l-0"]
    finally:
        await store.close()


async def test_an_admin_write_on_a_slot_stuck_in_migration_is_unavailable_not_a_crash(moving_cluster, prefix):
    """redis-py gives up on a slot that stays split ("TTL exhausted"): the admin call
    (and the reconciler) see StoreUnavailable, a 503 they retry, and nothing changed."""
    store = await _store_on(moving_cluster, prefix, "stuck", limit=1000)
    try:
        await store.top_up("default", "stuck", 500, "ref-0")
        migration = Migration(moving_cluster, store, "stuck")
        migration.begin(keys=1)
        with pytest.raises(StoreUnavailable):
            await store.top_up("default", "stuck", 700, "ref-1")  # consumer hash + reference: 2 keys
        migration.finish()
        assert (await store.top_up("default", "stuck", 700, "ref-1")).balance == 1_200
    finally:
        await store.close()
