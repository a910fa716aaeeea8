"""Redis Cluster slots (no I/O): the slot of a key, and the slot table read from
``CLUSTER SHARDS`` (Redis 7+) or ``CLUSTER SLOTS`` (older servers and proxies).

The slot of a key is CRC16 (XMODEM, what binascii.crc_hqx computes) of its hash tag
(the text between the first ``{`` and the next ``}``, when not empty) or of the whole
key, modulo 16384: https://redis.io/docs/latest/operate/oss_and_stack/reference/cluster-spec/
"""

from __future__ import annotations

from binascii import crc_hqx
from collections.abc import Sequence
from typing import Any

import msgspec

from sidecar.store.target import Address

SLOTS = 16384


def key_slot(key: str | bytes) -> int:
    data = key.encode() if isinstance(key, str) else key
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    return crc_hqx(data, 0) % SLOTS


class SlotRange(msgspec.Struct, frozen=True):
    start: int
    end: int  # inclusive
    master: Address
    healthy: bool = True  # CLUSTER SHARDS says the master is online


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pairs(flat: Sequence[Any]) -> dict[str, Any]:
    """A RESP2 map (a flat key, value, key, value... array) as a dict."""
    return {_text(flat[i]): flat[i + 1] for i in range(0, len(flat) - 1, 2)}


def _endpoint(node: dict[str, Any], announced_by: Address) -> str:
    """The host to connect to: the endpoint, unless it is "?" or empty (unknown: the
    node that answered) or the ip when the endpoint is absent."""
    endpoint = _text(node.get("endpoint") or node.get("ip") or "")
    return announced_by[0] if endpoint in ("", "?") else endpoint


def ranges_from_shards(reply: Sequence[Any], announced_by: Address) -> list[SlotRange]:
    """Parse a raw ``CLUSTER SHARDS`` reply (RESP2 arrays)."""
    ranges = []
    for shard_flat in reply:
        shard = _pairs(shard_flat)
        masters = [
            _pairs(n) for n in shard.get("nodes", []) if _pairs(n).get("role") in (b"master", "master")
        ]
        if not masters:
            continue
        node = masters[0]
        port = node.get("port") or node.get("tls-port")
        address = (_endpoint(node, announced_by), int(port))
        healthy = _text(node.get("health", b"online")) == "online"
        bounds = list(shard.get("slots", []))
        for i in range(0, len(bounds) - 1, 2):
            ranges.append(SlotRange(int(bounds[i]), int(bounds[i + 1]), address, healthy))
    return sorted(ranges, key=lambda r: r.start)


def ranges_from_slots(reply: Sequence[Any], announced_by: Address) -> list[SlotRange]:
    """Parse a raw ``CLUSTER SLOTS`` reply: [start, end, [host, port, id, ...], replicas...]."""
    ranges = []
    for entry in reply:
        master = entry[2]
        host = _text(master[0])
        address = (announced_by[0] if host in ("", "?") else host, int(master[1]))
        ranges.append(SlotRange(int(entry[0]), int(entry[1]), address))
    return sorted(ranges, key=lambda r: r.start)


def owners(ranges: Sequence[SlotRange]) -> list[Address | None]:
    """The master of every slot (None where no range covers it)."""
    table: list[Address | None] = [None] * SLOTS
    for r in ranges:
        for slot in range(r.start, r.end + 1):
            table[slot] = r.master
    return table


def uncovered(ranges: Sequence[SlotRange]) -> list[tuple[int, int]]:
    """Slot ranges that no healthy master serves, merged (for readiness and errors)."""
    served = [False] * SLOTS
    for r in ranges:
        if r.healthy:
            served[r.start : r.end + 1] = [True] * (r.end - r.start + 1)
    gaps: list[tuple[int, int]] = []
    slot = 0
    while slot < SLOTS:
        if served[slot]:
            slot += 1
            continue
        start = slot
        while slot < SLOTS and not served[slot]:
            slot += 1
        gaps.append((start, slot - 1))
    return gaps
