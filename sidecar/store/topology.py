"""Open what the store talks to, by topology: the router of the hot path (routing.py)
and a redis-py client for everything else (admin writes, the reconciler, pub/sub).

- standalone: one pipelined connection and a ``redis.asyncio.Redis``;
- cluster: a pipelined connection per master and a ``redis.asyncio.RedisCluster``,
  both following the cluster's slot table;
- sentinel: the primary Sentinel names, looked up again on every (re)connection, for
  the pipelined connection and for the pool of ``Sentinel.master_for``; both follow the
  primary on a failover.

``auto`` (a plain ``redis://`` URL) asks the node ``INFO cluster`` once, at open.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import msgspec
import redis.exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from sidecar.store.base import StoreUnavailable
from sidecar.store.resp import PipelinedConnection, RedisReplyError, encode_command
from sidecar.store.routing import ClusterRouter, Router, SingleRouter
from sidecar.store.target import Address, RedisTarget


class Timeouts(NamedTuple):
    connect_s: float
    socket_s: float
    # The breaker's cooldown: a node found down is not tried again for this long.
    cooldown_s: float
    max_connections: int


class Backend(NamedTuple):
    target: RedisTarget  # topology settled (never "auto")
    client: Redis | RedisCluster
    router: Router


class TopologyError(StoreUnavailable):
    """The Redis found contradicts the settings (e.g. database 3 on a cluster node)."""


def _common(target: RedisTarget, timeouts: Timeouts) -> dict[str, object]:
    # No client-side retries: a write that timed out may have run, and only a request
    # id or a version (not a blind retry) may safely repeat it.
    return {
        "username": target.username,
        "password": target.password,
        "socket_connect_timeout": timeouts.connect_s,
        "socket_timeout": timeouts.socket_s,
        "retry": Retry(NoBackoff(), 0),
        "max_connections": timeouts.max_connections,
        "health_check_interval": 0,
    }


async def _is_cluster_node(target: RedisTarget, timeouts: Timeouts) -> bool:
    if target.unix_path is None and not target.hosts:
        return False
    # Database 0 for the question: a cluster node refuses SELECT.
    plain = msgspec.structs.replace(target, db=0)
    probe = PipelinedConnection(plain, target.hosts[0] if target.hosts else None, timeouts.connect_s)
    try:
        info = await probe.execute(encode_command(["INFO", "cluster"]), time.monotonic() + timeouts.socket_s)
    except (RedisReplyError, TimeoutError) as exc:
        raise StoreUnavailable(f"redis {probe.name}: INFO cluster failed: {exc}") from exc
    finally:
        probe.close()
    assert isinstance(info, bytes)
    return b"cluster_enabled:1" in info


async def open_backend(target: RedisTarget, timeouts: Timeouts) -> Backend:
    """Settle ``auto`` and open the clients (connections are made on first use)."""
    if target.topology == "auto":
        if await _is_cluster_node(target, timeouts):
            if target.db:
                raise TopologyError(
                    f"redis {target.describe()} is a cluster node, which has only database 0, "
                    f"but the URL names database {target.db}"
                )
            target = target.with_topology("cluster")
        else:
            target = target.with_topology("standalone")
    if target.topology == "cluster":
        client: Redis | RedisCluster = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in target.hosts],
            ssl=target.tls,
            require_full_coverage=False,
            **_common(target, timeouts),  # type: ignore[arg-type]
        )
        router: Router = ClusterRouter(target, timeouts.connect_s, timeouts.cooldown_s)
        return Backend(target, client, router)
    if target.topology == "sentinel":
        return _sentinel_backend(target, timeouts)
    settings = Redis(
        host=target.hosts[0][0] if target.hosts else "localhost",
        port=target.hosts[0][1] if target.hosts else 6379,
        unix_socket_path=target.unix_path,
        db=target.db,
        ssl=target.tls,
        **_common(target, timeouts),  # type: ignore[arg-type]
    ).connection_pool  # its connection class and arguments (unix socket, TLS) only
    # A burst of more non-decision calls than connections (an import of 1,000 consumers,
    # listings) waits up to the socket timeout for a free connection instead of failing.
    client = Redis.from_pool(
        BlockingConnectionPool(
            connection_class=settings.connection_class,
            max_connections=timeouts.max_connections,
            timeout=timeouts.socket_s,
            **settings.connection_kwargs,
        )
    )
    node = PipelinedConnection(
        target, target.hosts[0] if target.hosts else None, timeouts.connect_s, timeouts.cooldown_s
    )
    return Backend(target, client, SingleRouter(node))


def _sentinel_backend(target: RedisTarget, timeouts: Timeouts) -> Backend:
    assert target.service is not None
    sentinel_kwargs: dict[str, object] = {
        "socket_connect_timeout": timeouts.connect_s,
        "socket_timeout": timeouts.socket_s,
        "ssl": target.tls,
    }
    if target.sentinel_password is not None:
        sentinel_kwargs["password"] = target.sentinel_password
    sentinel = Sentinel(
        list(target.hosts),
        sentinel_kwargs=sentinel_kwargs,
        db=target.db,
        ssl=target.tls,
        **_common(target, timeouts),
    )
    service = target.service

    async def locate() -> Address:
        try:
            host, port = await sentinel.discover_master(service)
        except (redis_errors.RedisError, OSError) as exc:
            raise StoreUnavailable(f"sentinel: no primary for {service!r}: {exc}") from exc
        return (host.decode() if isinstance(host, bytes) else host), int(port)

    client = sentinel.master_for(service)
    node = PipelinedConnection(target, None, timeouts.connect_s, timeouts.cooldown_s, locate=locate)
    return Backend(target, client, SingleRouter(node))
