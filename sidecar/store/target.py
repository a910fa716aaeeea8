"""Which Redis the store talks to, parsed from the settings (no I/O).

One URL names the deployment, its scheme the topology (as in alisaifee/limits):

    redis://[user:password@]host[:port][/db]     one Redis (a cluster node is detected)
    rediss://...                                  the same over TLS
    unix:///path/redis.sock[?db=N]                one Redis on a Unix socket
    redis+cluster://[user:password@]host:port[,host:port...]
                                                  a Redis Cluster, from its seed nodes
    redis+sentinel://[user:password@]host:port[,host:port...]/master-name[/db]
                                                  a primary watched by Sentinel
    rediss+cluster://..., rediss+sentinel://...   the same over TLS

The user and password are those of the data nodes (the cluster nodes, the primary and
its replicas). Sentinels that require a password of their own take it from the
``redis_sentinel_password`` setting. ``redis_topology`` names the topology explicitly:
``auto`` (the default) follows the scheme and, for a plain ``redis://`` URL, asks the
node at start whether it is a cluster node (``INFO cluster``).
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import parse_qs, unquote, urlsplit

import msgspec

from sidecar.core.digits import digits

Topology = Literal["auto", "standalone", "cluster", "sentinel"]
TOPOLOGIES: tuple[Topology, ...] = ("auto", "standalone", "cluster", "sentinel")
DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379
# scheme -> (topology it names, TLS)
_SCHEMES: dict[str, tuple[Topology, bool]] = {
    "redis": ("auto", False),
    "rediss": ("auto", True),
    "unix": ("standalone", False),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
}

Address = tuple[str, int]


class RedisTargetError(ValueError):
    """The Redis URL or topology settings are invalid; the message says why."""


class RedisTarget(msgspec.Struct, frozen=True, kw_only=True):
    """A parsed Redis deployment. ``hosts`` are the one node (standalone), the seed
    nodes (cluster) or the sentinels (sentinel)."""

    topology: Topology
    hosts: tuple[Address, ...] = ()
    unix_path: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    # Sentinel: the name the sentinels know the primary by, and their own password.
    service: str | None = None
    sentinel_password: str | None = None

    def with_topology(self, topology: Topology) -> RedisTarget:
        """This target once ``auto`` has been settled by asking the node."""
        return msgspec.structs.replace(self, topology=topology)

    def describe(self) -> str:
        """Where it points, without credentials (for logs and errors)."""
        where = self.unix_path or ",".join(f"{h}:{p}" for h, p in self.hosts)
        suffix = f" master {self.service!r}" if self.service else ""
        return f"{self.topology} {where}{suffix}"


def _address(text: str, default_port: int, url: str) -> Address:
    if text.startswith("["):  # [IPv6]:port
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = text.rpartition(":") if text.count(":") == 1 else (text, "", "")
    if not host:
        raise RedisTargetError(f"redis_url {url!r} names a node without a host")
    if port_text and not digits(port_text):
        raise RedisTargetError(f"redis_url {url!r}: port {port_text!r} is not a number")
    port = int(port_text) if port_text else default_port
    if not 1 <= port <= 65535:
        raise RedisTargetError(f"redis_url {url!r}: port {port} is out of range 1-65535")
    return host, port


def _db(text: str, url: str) -> int:
    if text == "":
        return 0
    if not digits(text) or int(text) > 15_999:
        raise RedisTargetError(f"redis_url {url!r}: database {text!r} is not a number")
    return int(text)


def parse_redis_target(
    url: str, topology: Topology = "auto", sentinel_password: str | None = None
) -> RedisTarget:
    """Parse and check ``url`` against the ``topology`` setting; RedisTargetError says
    what is wrong."""
    if topology not in TOPOLOGIES:
        raise RedisTargetError(f"redis_topology {topology!r} is not one of {', '.join(TOPOLOGIES)}")
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in _SCHEMES:
        raise RedisTargetError(
            f"redis_url {url!r} is not a Redis URL (expected redis://host:port/db, rediss://..., "
            "unix:///path, redis+cluster://host:port,host:port or "
            "redis+sentinel://host:port,host:port/master-name)"
        )
    named, tls = _SCHEMES[scheme.lower()]
    if topology != "auto" and named not in ("auto", topology):
        raise RedisTargetError(f"redis_topology {topology!r} contradicts the {scheme}:// URL {url!r}")
    if topology == "sentinel" and named == "auto":
        raise RedisTargetError("a Sentinel set is named by a redis+sentinel://host:port,.../master-name URL")
    effective: Topology = named if named != "auto" else topology
    if sentinel_password is not None and effective != "sentinel":
        raise RedisTargetError("redis_sentinel_password is only used with a redis+sentinel:// URL")

    if scheme.lower() == "unix":
        parts = urlsplit(url)
        if not parts.path:
            raise RedisTargetError(f"redis_url {url!r} names no socket path")
        return RedisTarget(
            topology="standalone",
            unix_path=parts.path,
            db=_db(parse_qs(parts.query).get("db", [""])[0], url),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )

    netloc, _, path = rest.partition("/")
    path, _, _query = path.partition("?")
    credentials, at, hosts_text = netloc.rpartition("@")
    username = password = None
    if at:
        user_text, colon, password_text = credentials.partition(":")
        username = unquote(user_text) or None
        password = unquote(password_text) if colon else None
    default_port = DEFAULT_SENTINEL_PORT if effective == "sentinel" else DEFAULT_PORT
    hosts = tuple(_address(h, default_port, url) for h in hosts_text.split(",")) if hosts_text else ()
    if not hosts:
        raise RedisTargetError(f"redis_url {url!r} names no host")
    if len(set(hosts)) != len(hosts):
        raise RedisTargetError(f"redis_url {url!r} names a node twice")
    segments = [s for s in path.split("/") if s]
    service = None
    if effective == "sentinel":
        if not segments:
            raise RedisTargetError(
                f"redis_url {url!r} names no master: redis+sentinel://host:port,.../master-name[/db]"
            )
        service, segments = unquote(segments[0]), segments[1:]
    if len(segments) > 1:
        raise RedisTargetError(f"redis_url {url!r} has an unexpected path {path!r}")
    db = _db(segments[0] if segments else "", url)
    if effective == "cluster" and db != 0:
        raise RedisTargetError(f"redis_url {url!r}: a Redis Cluster has only database 0")
    if effective in ("auto", "standalone") and len(hosts) > 1:
        raise RedisTargetError(
            f"redis_url {url!r} names several nodes: use redis+cluster://... for a cluster "
            "or redis+sentinel://.../master-name for Sentinel"
        )
    return RedisTarget(
        topology=effective,
        hosts=hosts,
        db=db,
        username=username,
        password=password,
        tls=tls,
        service=service,
        sentinel_password=sentinel_password,
    )
