"""Naming the Redis deployment: URL schemes, the topology setting, detection of a
cluster node at start, and bad values stopping the process with a message."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from sidecar.config import SettingsError, load_settings
from sidecar.core.clock import now_ms
from sidecar.core.models import ConsumerSpec, Plan
from sidecar.store.redis_store import RedisStore
from sidecar.store.target import RedisTarget, RedisTargetError, parse_redis_target
from sidecar.store.topology import TopologyError
from tests.redis_servers import free_port
from tests.test_redis_store import decision_call


@pytest.mark.parametrize(
    ("url", "topology", "expected"),
    [
        (
            "redis://127.0.0.1:6380/2",
            "auto",
            RedisTarget(topology="auto", hosts=(("127.0.0.1", 6380),), db=2),
        ),
        (
            "rediss://user:p%40ss@cache.example:6390",
            "standalone",
            RedisTarget(
                topology="standalone",
                hosts=(("cache.example", 6390),),
                username="user",
                password="p@ss",
                tls=True,
            ),
        ),
        (
            "unix:///run/redis.sock?db=4",
            "auto",
            RedisTarget(topology="standalone", unix_path="/run/redis.sock", db=4),
        ),
        (
            "redis+cluster://:secret@10.0.0.1:7001,10.0.0.2:7002,10.0.0.3",
            "auto",
            RedisTarget(
                topology="cluster",
                hosts=(("10.0.0.1", 7001), ("10.0.0.2", 7002), ("10.0.0.3", 6379)),
                password="secret",
            ),
        ),
        (
            "redis://10.0.0.1:7001,10.0.0.2:7002",
            "cluster",
            RedisTarget(topology="cluster", hosts=(("10.0.0.1", 7001), ("10.0.0.2", 7002))),
        ),
        (
            "rediss+sentinel://s1,s2:26380,[::1]:26381/my-primary/3",
            "auto",
            RedisTarget(
                topology="sentinel",
                hosts=(("s1", 26379), ("s2", 26380), ("::1", 26381)),
                db=3,
                tls=True,
                service="my-primary",
            ),
        ),
    ],
)
def test_urls_name_the_deployment(url, topology, expected):
    assert parse_redis_target(url, topology) == expected


@pytest.mark.parametrize(
    ("url", "topology", "message"),
    [
        ("http://localhost:6379", "auto", "is not a Redis URL"),
        ("redis://", "auto", "names no host"),
        ("redis://a:1,b:2", "auto", "names several nodes: use redis+cluster://"),
        ("redis+cluster://a:1,a:1", "auto", "names a node twice"),
        ("redis+cluster://a:1/2", "auto", "a Redis Cluster has only database 0"),
        ("redis+sentinel://a:26379", "auto", "names no master"),
        ("redis+sentinel://a:26379/m", "cluster", "contradicts the redis+sentinel:// URL"),
        ("redis://a:6379", "sentinel", "a Sentinel set is named by a redis+sentinel://"),
        ("redis://a:99999", "auto", "port 99999 is out of range"),
        ("redis://a:port", "auto", "port 'port' is not a number"),
        ("redis://a:6379/x", "auto", "database 'x' is not a number"),
        ("redis://a:6379/0", "mesh", "redis_topology 'mesh' is not one of"),
    ],
)
def test_bad_urls_are_refused_with_a_reason(url, topology, message):
    with pytest.raises(RedisTargetError, match=re.escape(message)):
        parse_redis_target(url, topology)  # type: ignore[arg-type]


def test_settings_check_the_topology_at_start():
    with pytest.raises(SettingsError, match="redis_sentinel_password is only used with a redis"):
        load_settings({"redis_url": "redis://a:6379", "redis_sentinel_password": "x" * 16}, environ={})
    with pytest.raises(SettingsError, match="need redis_url"):
        load_settings({"redis_topology": "cluster"}, environ={})
    settings = load_settings(
        environ={
            "AFORO_REDIS_URL": "redis+sentinel://s1:26379,s2:26379/main",
            "AFORO_REDIS_SENTINEL_PASSWORD": "sentinel-secret",
        }
    )
    target = settings.redis_target()
    assert (target.topology, target.service, target.sentinel_password) == (
        "sentinel",
        "main",
        "sentinel-secret",
    )
    # Worker processes rebuild the same settings from the environment.
    assert load_settings(environ=settings.to_env()) == settings


def test_a_bad_redis_setting_stops_serve_with_a_message():
    env = {k: v for k, v in os.environ.items() if not k.startswith("AFORO_")}
    for args, message in (
        (["--redis-url", "redis+sentinel://127.0.0.1:26379"], "names no master"),
        (["--redis-url", "redis://127.0.0.1:6379", "--redis-topology", "sentinel"], "redis+sentinel://"),
        (["--redis-url", "redis://127.0.0.1:6379", "--redis-topology", "ring"], "redis_topology"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "sidecar.cli", "serve", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
        )
        assert result.returncode == 2, result.stderr
        assert "configuration error" in result.stderr and message in result.stderr


async def test_a_plain_url_to_a_cluster_node_is_detected_as_a_cluster(redis_cluster, prefix):
    node = redis_cluster.servers[0]
    store = RedisStore(f"redis://127.0.0.1:{node.port}/0", prefix=prefix)
    try:
        await store.load_scripts()
        assert store.topology == "cluster"
        await store.put_plan(Plan(id="p", windows={"minute": 3}).validated())
        # Consumers on every master: each decided through the node owning its slot.
        ids = [f"c{i}" for i in range(12)]
        masters = {redis_cluster.master_of(store.keys.consumer("default", c)).port for c in ids}
        assert len(masters) == 3
        for consumer_id in ids:
            await store.put_consumer(ConsumerSpec(id=consumer_id, plan_id="p").validated(), now_ms())
            outcome = await store.decide(decision_call(consumer_id=consumer_id))
            assert outcome.reason == "ok"
    finally:
        await store.close()


async def test_a_standalone_node_stays_standalone(redis_url, prefix):
    store = RedisStore(redis_url, prefix=prefix)
    try:
        await store.load_scripts()
        assert store.topology == "standalone"
    finally:
        await store.close()


async def test_a_cluster_node_named_with_a_database_is_refused(redis_cluster, prefix):
    node = redis_cluster.servers[0]
    store = RedisStore(f"redis://127.0.0.1:{node.port}/3", prefix=prefix)
    try:
        with pytest.raises(TopologyError, match="has only database 0"):
            await store.load_scripts()
    finally:
        await store.close()


def test_serve_stops_when_the_node_turns_out_to_be_a_cluster_node_with_a_database(redis_cluster):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AFORO_")}
    node = redis_cluster.servers[0]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sidecar.cli",
            "serve",
            "--port",
            str(free_port()),
            "--redis-url",
            f"redis://127.0.0.1:{node.port}/3",
        ],
        capture_output=True,
        text=True,
        env={**env, "AFORO_GRPC_PORT": "0", "AFORO_DECISION_PORT": "0"},
        timeout=60,
    )
    assert result.returncode != 0
    assert "is a cluster node, which has only database 0" in result.stderr
