"""Every command the store sends touches one cluster slot (so CROSSSLOT cannot happen).

Every store operation runs on the shared cluster while MONITOR records what each master
executes, the commands run inside the Lua scripts included; the keys of each command
are asked of Redis itself (COMMAND GETKEYS) and must share one slot. The scripts the
operations ran must be every script of store/lua/."""

from __future__ import annotations

import re
import socket
import threading

import pytest
import redis

from sidecar.core.clock import now_ms
from sidecar.core.errors import Conflict
from sidecar.core.models import ConsumerKey, ConsumerSpec, ConsumerStatus, Plan, UsageEvent
from sidecar.store.redis_store import RedisStore
from sidecar.store.slots import key_slot
from tests.redis_servers import RedisServer
from tests.test_redis_store import decision_call

_ARG = re.compile(r'"((?:[^"\\]|\\.)*)"')
_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "a": "\a", "b": "\b", '"': '"', "\\": "\\"}


def _unrepr(text: str) -> bytes:
    """Undo Redis's sdscatrepr quoting of one MONITOR argument."""
    out = bytearray()
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt == "x":
                out.append(int(text[i + 2 : i + 4], 16))
                i += 4
                continue
            out += _ESCAPES.get(nxt, nxt).encode()
            i += 2
            continue
        out += char.encode("latin-1")
        i += 1
    return bytes(out)


class Monitor:
    """MONITOR on one node, over a raw socket, in a thread: every command it runs."""

    def __init__(self, server: RedisServer) -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.port))
        self.sock.sendall(b"MONITOR\r\n")
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buffer += chunk
            *lines, buffer = buffer.split(b"\r\n")
            self.lines += [line.decode("latin-1") for line in lines]

    def commands(self) -> list[list[bytes]]:
        return [[_unrepr(a) for a in _ARG.findall(line)] for line in self.lines if line.startswith("+1")]

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)  # wakes the reading thread
        self.sock.close()
        self.thread.join(timeout=5)


async def _every_store_operation(store: RedisStore) -> None:
    now = now_ms()
    await store.load_scripts()
    await store.put_plan(Plan(id="gold", windows={"minute": 50, "month": 1000}, price=10).validated())
    await store.put_plan(Plan(id="free", windows={"day": 5}).validated())
    for i in range(6):  # consumers on every master
        await store.put_consumer(ConsumerSpec(id=f"c{i}", plan_id="gold").validated(), now)
        await store.top_up("default", f"c{i}", 1_000, f"ref-{i}")
    await store.apply_plan(
        Plan(id="gold", windows={"minute": 60}, price=10).validated(), None
    )  # binds members
    await store.put_consumer(ConsumerSpec(id="c5", plan_id="free").validated(), now)  # leaves gold
    await store.add_key("default", "c0", ConsumerKey("a" * 64))
    assert await store.resolve_key("default", "a" * 64) == "c0"
    for i in range(6):
        await store.decide(decision_call(consumer_id=f"c{i}", request_id=f"r{i}"))
        await store.decide(decision_call(consumer_id=f"c{i}", request_id="", idempotency_ttl_ms=0))
    await store.decide(decision_call(consumer_id="c0", key_hash="a" * 64, request_id="keyed"))
    await store.apply_keys(
        "default", "c0", {"b" * 64: ConsumerKey("b" * 64, scopes=("api",))}
    )  # adds b, revokes a
    await store.revoke_key("default", "c0", "b" * 64)
    await store.set_status("default", "c1", ConsumerStatus.SUSPENDED, now)
    await store.get_consumer("default", "c1", now)
    await store.get_plan("default", "gold")
    events = [
        UsageEvent(
            request_id=f"e{i}", tenant="default", consumer_id=f"c{i}", product="api", started_at_ms=now
        )
        for i in range(6)
    ]
    await store.record_events(events, 60_000)
    await store.events("default", "c0")
    await store.usage("default", "c0")
    await store.flush_dirty()
    popped = await store.take_dirty(100)
    await store.return_dirty(popped)
    for kind in ("u", "g"):
        assert len(await store.scan_streams(kind)) == 6
    usage = await store.read_usage("default", "c2", 10)
    await store.settle("default", "c2", 900, 100, 5, trim_before=usage[-1][0])
    await store.trim_usage("default", "c2", usage[-1][0])
    read = await store.read_events("default", "c3", 10)
    await store.trim_events("default", "c3", read[-1][0])
    await store.window_counts("default", "c4", decision_call().window_starts_ms)
    await store.publish_invalidation("default", "c4")
    await store.ping()
    # Listing, the full sync's scans, deletions.
    plans, _ = await store.list_plans("default", None, 10)
    assert {p.id for p in plans} == {"gold", "free"}
    page, after = await store.list_consumers("default", None, 3, now, plan_id="gold")
    assert len(page) == 3 and after is not None
    assert await store.consumer_keys("default", "c0") == []
    assert len(await store.scan_consumers()) == 6 and len(await store.scan_plans()) == 2
    await store.add_key("default", "c3", ConsumerKey("c" * 64, now))
    for tenant, key_hash, owner in await store.scan_key_index():
        await store.drop_key_index(tenant, key_hash, owner)
    with pytest.raises(Conflict):
        await store.delete_plan("default", "free")  # c5 is bound to it
    assert await store.delete_consumer("default", "c5", now)
    assert await store.delete_plan("default", "free")
    assert await store.prune("default") == 0


async def test_every_command_and_script_touches_one_slot(redis_cluster, prefix):
    masters = redis_cluster.masters()
    monitors = [Monitor(server) for server in masters]
    store = RedisStore(redis_cluster.url, prefix=prefix)
    try:
        await _every_store_operation(store)
    finally:
        await store.close()
        for monitor in monitors:
            monitor.close()
    node = masters[0].client()
    commands = [c for m in monitors for c in m.commands() if any(prefix.encode() in arg for arg in c)]
    assert commands, "MONITOR saw nothing"
    names: set[str] = set()
    scripts: set[str] = set()
    for args in commands:
        name = args[0].decode().upper()
        names.add(name)
        if name == "EVALSHA":
            scripts.add(args[1].decode())
        if name in ("PUBLISH", "SCAN"):
            continue  # a channel and a pattern, not keys
        try:
            keys = node.command_getkeys(*args)
        except redis.ResponseError as exc:
            pytest.fail(f"COMMAND GETKEYS refused {args[:3]}: {exc}")
        slots = {key_slot(k) for k in keys}
        assert len(slots) == 1, f"{name} touches {len(slots)} slots: {keys}"
    assert scripts == {s.sha for s in store.scripts}, "an operation of the store was not exercised"
    # The Lua scripts' own commands were seen too (MONITOR lists them after EVALSHA).
    assert {"HINCRBY", "INCRBY", "XADD", "HSET"} <= names
