"""Redis servers of the tests' own, started from ``redis-server`` itself: one server, a
Redis Cluster (3 masters, 3 replicas) and a primary + replica watched by 3 Sentinels.
Each runs on free ports in a folder of its own and is stopped by PID."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import TypeVar

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.sentinel import Sentinel

from sidecar.store.slots import key_slot
from sidecar.store.target import parse_redis_target

ServerSet = TypeVar("ServerSet", "RedisServer", "RedisClusterServers", "SentinelServers")
NODE_TIMEOUT_MS = 1000  # cluster and Sentinel: how long before a silent node is failed
SERVICE = "mymaster"


# Ports below the kernel's ephemeral range (32768-60999 by default): a port picked there
# and released can be taken by any outgoing connection's local end before the server we
# start binds it (a CI run lost a cluster node that way). Below the range only a listener
# can take it, and each port is handed out once per test process.
_PORTS_FROM, _PORTS_TO = 20000, 32000
_handed_out: set[int] = set()


def free_port() -> int:
    for _ in range(1000):
        port = random.randint(_PORTS_FROM, _PORTS_TO)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise AssertionError(f"no free port between {_PORTS_FROM} and {_PORTS_TO}")


def _binary(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed"
    return path


def wait_for(condition, timeout: float, what: str, interval: float = 0.05) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except (redis.RedisError, OSError):
            pass
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class RedisServer:
    """One ``redis-server`` process on a port of its own, in ``folder``."""

    def __init__(self, folder: str, *args: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = folder
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        os.makedirs(folder, exist_ok=True)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                _binary("redis-server"),
                *self.args,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                "--logfile",
                os.path.join(self.dir, "redis.log"),
            ],
            cwd=self.dir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(self._ping, 10, f"redis-server on port {self.port}")

    def _ping(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            # Say why at once (the log holds the reason: a port taken, a bad option)
            # instead of waiting out the timeout.
            with open(os.path.join(self.dir, "redis.log"), errors="replace") as log:
                tail = log.read()[-2000:]
            raise AssertionError(f"redis-server on port {self.port} exited: {tail}")
        return bool(self.client().ping())

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_connect_timeout=0.5, socket_timeout=5)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)  # a frozen process dies too
        self.proc.kill()
        self.proc.wait()

    def freeze(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.alive:
            self.kill()


class PrivateRedis(RedisServer):
    """A standalone server a test may kill, freeze and restart (empty) on its port."""


class RedisClusterServers:
    """A 3-master, 3-replica Redis Cluster, created with ``redis-cli --cluster create``.

    ``cluster-require-full-coverage no``: a slot range without a master stops only its
    own keys (the setting the README recommends). ``cluster-node-timeout`` is short so
    a failover takes a second or two."""

    def __init__(self, folder: str, masters: int = 3, replicas: int = 1) -> None:
        self.folder = folder
        args = (
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            str(NODE_TIMEOUT_MS),
            "--cluster-require-full-coverage",
            "no",
        )
        # Each node's cluster bus gets a free port of its own (the default, port +
        # 10000, may be taken or out of range).
        self.servers = [
            RedisServer(os.path.join(folder, f"node-{i}"), *args, "--cluster-port", str(free_port()))
            for i in range(masters * (1 + replicas))
        ]
        self.masters_count = masters
        self.replicas = replicas

    @property
    def url(self) -> str:
        seeds = ",".join(f"127.0.0.1:{s.port}" for s in self.servers[: self.masters_count])
        return f"redis+cluster://{seeds}"

    def start(self) -> None:
        for server in self.servers:
            server.start()
        result = subprocess.run(
            [
                _binary("redis-cli"),
                "--cluster",
                "create",
                *(f"127.0.0.1:{s.port}" for s in self.servers),
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        self.wait_ok()
        # Every replica has synced with its master (failover tests need it).
        wait_for(self._replicas_synced, 30, "replicas in sync")

    def _replicas_synced(self) -> bool:
        for server in self.live():
            info = server.client().info("replication")
            if info["role"] == "slave" and info.get("master_link_status") != "up":
                return False
        return True

    def live(self) -> list[RedisServer]:
        return [s for s in self.servers if s.alive]

    def wait_ok(self, timeout: float = 30) -> None:
        """Every live node says cluster_state:ok and agrees on who serves every slot."""

        def ok() -> bool:
            views = []
            for server in self.live():
                if server.client().cluster("info")["cluster_state"] != "ok":
                    return False
                views.append(sorted(self._owner_ports(server)))
            return all(v == views[0] for v in views)

        wait_for(ok, timeout, "cluster_state:ok on every node", interval=0.1)

    @staticmethod
    def _owner_ports(server: RedisServer) -> list[tuple[int, int, int]]:
        """(first slot, last slot, master port) as ``server`` sees the cluster."""
        entries = server.client().execute_command("CLUSTER", "SLOTS")
        return [(int(e[0]), int(e[1]), int(e[2][1])) for e in entries]

    def masters(self) -> list[RedisServer]:
        return [s for s in self.live() if s.client().info("replication")["role"] == "master"]

    def server_on(self, port: int) -> RedisServer:
        return next(s for s in self.servers if s.port == port)

    def master_of(self, key: str) -> RedisServer:
        return self.master_of_slot(key_slot(key))

    def replicas_of(self, master: RedisServer) -> list[RedisServer]:
        replicas = master.client().execute_command("CLUSTER", "REPLICAS", self.node_id(master))
        ports = {int(line.split()[1].split("@")[0].rsplit(":", 1)[1]) for line in _lines(replicas)}
        return [s for s in self.live() if s.port in ports]

    def node_id(self, server: RedisServer) -> str:
        return _text(server.client().cluster("myid"))

    def begin_migration(self, slot: int, to: RedisServer) -> RedisServer:
        """Mark ``slot`` IMPORTING on ``to`` and MIGRATING on its owner (returned), the
        first step of a resharding (what ``redis-cli --cluster reshard`` does per slot)."""
        source = self.master_of_slot(slot)
        to.client().execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", self.node_id(source))
        source.client().execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", self.node_id(to))
        return source

    def migrate_keys(self, slot: int, source: RedisServer, to: RedisServer, count: int = 1000) -> int:
        keys = source.client().execute_command("CLUSTER", "GETKEYSINSLOT", slot, count)
        if keys:
            source.client().execute_command("MIGRATE", "127.0.0.1", to.port, "", 0, 5000, "KEYS", *keys)
        return len(keys)

    def finish_migration(self, slot: int, to: RedisServer) -> None:
        """Assign ``slot`` to ``to`` on every master (the last step of a resharding)."""
        for master in self.masters():
            master.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", self.node_id(to))

    def slot_owners(self) -> list[int]:
        """The port of the master of every slot, as the first live node sees it."""
        table = [0] * 16384
        for start, end, port in self._owner_ports(self.live()[0]):
            table[start : end + 1] = [port] * (end - start + 1)
        return table

    def master_of_slot(self, slot: int) -> RedisServer:
        for start, end, port in self._owner_ports(self.live()[0]):
            if start <= slot <= end:
                return self.server_on(port)
        raise AssertionError(f"no master serves slot {slot}")

    def reshard(self, count: int, source: RedisServer, to: RedisServer) -> None:
        """``redis-cli --cluster reshard``: move ``count`` slots from ``source`` to ``to``."""
        result = subprocess.run(
            [
                _binary("redis-cli"),
                "--cluster",
                "reshard",
                f"127.0.0.1:{to.port}",
                "--cluster-from",
                self.node_id(source),
                "--cluster-to",
                self.node_id(to),
                "--cluster-slots",
                str(count),
                "--cluster-yes",
                "--cluster-pipeline",
                "10",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr

    def client(self) -> RedisCluster:
        return RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", s.port) for s in self.live()])

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


class SentinelServers:
    """A primary, one replica, and 3 Sentinels watching them (quorum 2)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.primary = RedisServer(os.path.join(folder, "primary"))
        self.replica = RedisServer(os.path.join(folder, "replica"))
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def start(self) -> None:
        self.primary.start()
        self.replica.args = ("--replicaof", "127.0.0.1", str(self.primary.port))
        self.replica.start()
        for port in self.sentinel_ports:
            folder = os.path.join(self.folder, f"sentinel-{port}")
            os.makedirs(folder, exist_ok=True)
            config = os.path.join(folder, "sentinel.conf")
            with open(config, "w") as file:
                file.write(
                    f"port {port}\nbind 127.0.0.1\ndir {folder}\n"
                    f"logfile {os.path.join(folder, 'sentinel.log')}\n"
                    f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary.port} 2\n"
                    f"sentinel down-after-milliseconds {SERVICE} {NODE_TIMEOUT_MS}\n"
                    f"sentinel failover-timeout {SERVICE} 10000\n"
                    f"sentinel parallel-syncs {SERVICE} 1\n"
                )
            self.sentinels.append(
                subprocess.Popen(
                    [_binary("redis-server"), config, "--sentinel"],
                    cwd=folder,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        wait_for(self._watched, 30, "3 sentinels that know the primary and its replica", interval=0.1)

    def _watched(self) -> bool:
        for port in self.sentinel_ports:
            sentinel = redis.Redis(port=port, socket_connect_timeout=0.5)
            state = sentinel.sentinel_master(SERVICE)
            if state["num-other-sentinels"] < 2 or state["num-slaves"] < 1:
                return False
        return self.replica.client().info("replication").get("master_link_status") == "up"

    def current_primary(self) -> RedisServer:
        _, port = Sentinel([("127.0.0.1", p) for p in self.sentinel_ports]).discover_master(SERVICE)
        return self.primary if port == self.primary.port else self.replica

    def stop(self) -> None:
        for proc in self.sentinels:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.primary.stop()
        self.replica.stop()


@contextlib.contextmanager
def running(servers: ServerSet) -> Iterator[ServerSet]:
    """``servers`` started for the block, stopped (by PID) after it, even half-started."""
    try:
        servers.start()
        yield servers
    finally:
        servers.stop()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _lines(value: object) -> list[str]:
    if isinstance(value, list | tuple):
        return [_text(v) for v in value]
    return [line for line in _text(value).splitlines() if line]


def delete_prefix(url: str, prefix: str) -> None:
    """Delete every key under ``prefix`` on the deployment ``url`` names (every master
    of a cluster, the primary of a Sentinel set)."""
    target = parse_redis_target(url)
    if target.topology == "cluster":
        client: redis.Redis | RedisCluster = RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in target.hosts]
        )
    elif target.topology == "sentinel":
        assert target.service is not None
        client = Sentinel(list(target.hosts)).master_for(target.service)
    else:
        client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for key in keys:  # one key per DEL: keys of different slots cannot share one
            client.delete(key)
    finally:
        client.close()
