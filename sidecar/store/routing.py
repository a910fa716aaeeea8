"""The hot path's way to the Redis node that owns a command's keys.

Every command comes with the cluster slot of its keys (slots.key_slot). One Redis, or
the primary Sentinel names, is one pipelined connection whatever the slot. A Redis
Cluster is one pipelined connection per master and a slot table read from the
cluster; a command goes to its slot's master and is re-sent, none of these having run
it, on:

- ``MOVED slot host:port``: the slot lives elsewhere now; the table is corrected at
  once and re-read in the background;
- ``ASK slot host:port``: the slot is being migrated and the keys may be there: sent
  once to that node, right after ``ASKING``;
- ``TRYAGAIN``: the slot is being migrated and its keys are split between the two
  nodes: sent again a few milliseconds later, until the caller's deadline.

The table is also re-read when a node's connection is lost or refused and every
REFRESH_S; while a slot range has no reachable master, every REFRESH_UNHEALTHY_S. A
master that is down fails only the commands for its own slots (StoreUnavailable: the
caller's fail mode); the others keep going to their own masters.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Coroutine
from typing import Any, Protocol

from sidecar.store.base import StoreDown, StoreUnavailable
from sidecar.store.resp import (
    OnReply,
    PipelinedConnection,
    RedisReplyError,
    encode_command,
    ignore_reply,
    settle,
)
from sidecar.store.slots import SLOTS, SlotRange, owners, ranges_from_shards, ranges_from_slots, uncovered
from sidecar.store.target import Address, RedisTarget

log = logging.getLogger("aforo.store")

# Redirections (MOVED, ASK) one command may follow before it is given up on.
MAX_REDIRECTS = 5
# TRYAGAIN: first delay, cap, and how long a command without a deadline keeps trying.
TRYAGAIN_FIRST_S = 0.005
TRYAGAIN_CAP_S = 0.05
TRYAGAIN_BUDGET_S = 5.0
# Slot table re-reads: periodically, faster while a slot range has no reachable
# master, and at most this often when errors ask for one.
REFRESH_S = 5.0
REFRESH_UNHEALTHY_S = 0.25
REFRESH_MIN_GAP_S = 0.05
PING = encode_command(["PING"])


class Router(Protocol):
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the router runs on (captured once: looking it up costs a
        system call)."""
        ...

    def send(self, slot: int, command: bytes, on_reply: OnReply, deadline: float = 0.0) -> None:
        """Queue ``command`` for the node of ``slot``; on_reply gets the reply, or the
        failure (StoreUnavailable, TimeoutError past ``deadline``), exactly once."""
        ...

    async def execute(self, slot: int, command: bytes, deadline: float = 0.0) -> object:
        """``send`` and wait for the reply (a failure is raised)."""
        ...

    async def masters(self) -> list[PipelinedConnection]:
        """A connection to every master (one for a single node)."""
        ...

    async def check(self) -> None:
        """Raise StoreUnavailable unless every slot has a master that answers."""
        ...

    def close(self) -> None: ...


class _RouterBase:
    """What both routers share: the captured loop, background tasks, ``execute``."""

    _loop: asyncio.AbstractEventLoop | None = None
    _tasks: set[asyncio.Task[None]]

    def send(self, slot: int, command: bytes, on_reply: OnReply, deadline: float = 0.0) -> None:
        raise NotImplementedError

    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` (a connect, a re-send after a table read) as a task kept
        referenced until it ends."""
        task = self.loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def execute(self, slot: int, command: bytes, deadline: float = 0.0) -> object:
        future: asyncio.Future[object] = self.loop().create_future()
        self.send(slot, command, functools.partial(settle, future), deadline)
        return await future


class SingleRouter(_RouterBase):
    """One node: a standalone Redis, or the primary named by Sentinel (``locate``)."""

    def __init__(self, node: PipelinedConnection) -> None:
        self.node = node
        self._tasks: set[asyncio.Task[None]] = set()

    def send(self, slot: int, command: bytes, on_reply: OnReply, deadline: float = 0.0) -> None:
        if not self.node.send(command, on_reply, deadline):
            self._spawn(self.node.send_connecting(command, on_reply, deadline))

    async def masters(self) -> list[PipelinedConnection]:
        return [self.node]

    async def check(self) -> None:
        await self.node.execute(PING, time.monotonic() + 1.0)

    def close(self) -> None:
        self.node.close()


class _Routed:
    """The OnReply of a command on a cluster: follows MOVED / ASK / TRYAGAIN (the
    command did not run), passes everything else to the caller's ``on_reply``."""

    __slots__ = ("command", "deadline", "give_up", "on_reply", "redirects", "router", "slot", "tries")

    def __init__(
        self, router: ClusterRouter, slot: int, command: bytes, on_reply: OnReply, deadline: float
    ) -> None:
        self.router = router
        self.slot = slot
        self.command = command
        self.on_reply = on_reply
        self.deadline = deadline
        self.redirects = 0
        self.tries = 0
        self.give_up = 0.0  # TRYAGAIN: time.monotonic() past which it is not sent again

    def __call__(self, reply: object) -> None:
        if reply.__class__ is RedisReplyError:
            text = str(reply)
            if text.startswith(("MOVED ", "ASK ")):
                if self.redirects < MAX_REDIRECTS:
                    self.redirects += 1
                    self.router._redirected(self, text)
                    return
                reply = StoreUnavailable(f"redis cluster: too many redirections ({text})")
            elif text.startswith("TRYAGAIN"):
                if self.router._try_again(self):
                    return
                reply = StoreUnavailable(f"redis cluster: slot {self.slot} is still migrating ({text})")
        elif isinstance(reply, StoreUnavailable) and not isinstance(reply, StoreDown):
            self.router.refresh_soon()
        self.on_reply(reply)


class ClusterRouter(_RouterBase):
    def __init__(self, target: RedisTarget, connect_timeout_s: float, cooldown_s: float) -> None:
        self._target = target
        self._connect_timeout_s = connect_timeout_s
        self._cooldown_s = cooldown_s
        self._owners: list[Address | None] = [None] * SLOTS
        self.ranges: list[SlotRange] = []
        self._nodes: dict[Address, PipelinedConnection] = {}
        # Every node ever seen (seeds, masters, replicas): where the table can be read.
        self._known: list[Address] = list(target.hosts)
        self._tasks: set[asyncio.Task[None]] = set()
        self._refresh_task: asyncio.Task[None] | None = None
        self._last_refresh = 0.0
        self._ticker: asyncio.Task[None] | None = None
        self._closed = False

    # --- routing ----------------------------------------------------------------------

    def node(self, address: Address) -> PipelinedConnection:
        node = self._nodes.get(address)
        if node is None:
            node = self._nodes[address] = PipelinedConnection(
                self._target, address, self._connect_timeout_s, self._cooldown_s, on_lost=self._lost
            )
        return node

    def send(self, slot: int, command: bytes, on_reply: OnReply, deadline: float = 0.0) -> None:
        routed = _Routed(self, slot, command, on_reply, deadline)
        address = self._owners[slot]
        if address is None:
            self._spawn(self._send_when_known(routed))
            return
        self._to(self.node(address), routed)

    def _to(self, node: PipelinedConnection, routed: _Routed) -> None:
        if not node.send(routed.command, routed, routed.deadline):
            self._spawn(node.send_connecting(routed.command, routed, routed.deadline))

    async def _send_when_known(self, routed: _Routed) -> None:
        """The slot table is not read yet (first use) or has no master for the slot."""
        try:
            timeout = None if not routed.deadline else max(0.0, routed.deadline - time.monotonic())
            async with asyncio.timeout(timeout):
                await self.refresh()
        except TimeoutError as exc:
            routed.on_reply(exc)
            return
        except StoreUnavailable as exc:
            routed.on_reply(exc)
            return
        address = self._owners[routed.slot]
        if address is None:
            routed.on_reply(StoreUnavailable(f"redis cluster: no master serves slot {routed.slot}"))
            return
        self._to(self.node(address), routed)

    def _redirected(self, routed: _Routed, text: str) -> None:
        kind, slot_text, where = text.split(" ", 2)
        host, _, port = where.rpartition(":")
        address = (host or self._known[0][0], int(port))
        if address not in self._known:
            self._known.append(address)
        node = self.node(address)
        if kind == "MOVED":
            self._owners[int(slot_text)] = address
            self.refresh_soon()
            self._to(node, routed)
            return
        # ASK: this command only, right after ASKING on the same connection.
        asking = encode_command(["ASKING"])
        if node.send(asking, ignore_reply, routed.deadline):
            if not node.send(routed.command, routed, routed.deadline):
                routed(StoreUnavailable(f"redis {node.name} connection lost"))
            return
        self._spawn(self._ask_connecting(node, asking, routed))

    async def _ask_connecting(self, node: PipelinedConnection, asking: bytes, routed: _Routed) -> None:
        try:
            await node.connect()
        except StoreUnavailable as exc:
            routed(exc)
            return
        if not (
            node.send(asking, ignore_reply, routed.deadline)
            and node.send(routed.command, routed, routed.deadline)
        ):
            routed(StoreUnavailable(f"redis {node.name} connection lost"))

    def _try_again(self, routed: _Routed) -> bool:
        """Send ``routed`` again shortly (TRYAGAIN), if its deadline allows."""
        now = time.monotonic()
        if not routed.give_up:
            routed.give_up = routed.deadline or now + TRYAGAIN_BUDGET_S
        delay = min(TRYAGAIN_CAP_S, TRYAGAIN_FIRST_S * (2**routed.tries))
        routed.tries += 1
        if now + delay >= routed.give_up:
            return False
        self.loop().call_later(delay, self._resend, routed)
        return True

    def _resend(self, routed: _Routed) -> None:
        # A TRYAGAIN is bounded by time, not by redirections: the ASK it came through
        # is counted afresh.
        routed.redirects = 0
        address = self._owners[routed.slot]
        if address is None:
            self._spawn(self._send_when_known(routed))
        else:
            self._to(self.node(address), routed)

    # --- the slot table -------------------------------------------------------------------

    def _lost(self, node: PipelinedConnection) -> None:
        if not self._closed:
            self.refresh_soon()

    def refresh_soon(self) -> None:
        """Re-read the slot table in the background (one read at a time)."""
        if self._closed or (self._refresh_task is not None and not self._refresh_task.done()):
            return
        if time.monotonic() - self._last_refresh < REFRESH_MIN_GAP_S:
            return
        self._refresh_task = self.loop().create_task(self._refresh_quietly())

    async def _refresh_quietly(self) -> None:
        with contextlib.suppress(StoreUnavailable):
            await self.refresh()

    async def refresh(self) -> None:
        """Read the slot table from the first node that answers (masters first, then
        every other node seen); StoreUnavailable when none does."""
        self._last_refresh = time.monotonic()
        self._start_ticker()
        masters = list(dict.fromkeys(r.master for r in self.ranges if r.healthy))
        candidates = masters + [a for a in self._known if a not in masters]
        failures = []
        for address in candidates:
            node = self.node(address)
            if node.down:
                continue
            try:
                ranges = await self._read_table(node)
            except (StoreUnavailable, RedisReplyError, TimeoutError) as exc:
                failures.append(f"{node.name}: {exc}")
                continue
            if not ranges:
                failures.append(f"{node.name}: no slots assigned")
                continue
            self._apply(ranges)
            return
        raise StoreUnavailable(
            f"redis cluster: no node gave the slot table ({'; '.join(failures) or 'none'})"
        )

    async def _read_table(self, node: PipelinedConnection) -> list[SlotRange]:
        deadline = time.monotonic() + max(1.0, self._connect_timeout_s * 2)
        assert node.address is not None
        try:
            reply = await node.execute(encode_command(["CLUSTER", "SHARDS"]), deadline)
            return ranges_from_shards(reply, node.address)  # type: ignore[arg-type]
        except RedisReplyError as exc:
            if "unknown" not in str(exc).lower():
                raise
        reply = await node.execute(encode_command(["CLUSTER", "SLOTS"]), deadline)
        return ranges_from_slots(reply, node.address)  # type: ignore[arg-type]

    def _apply(self, ranges: list[SlotRange]) -> None:
        if ranges != self.ranges:
            log.info(
                "redis cluster slot table: %s",
                ", ".join(
                    f"{r.start}-{r.end}@{r.master[0]}:{r.master[1]}{'' if r.healthy else '(failed)'}"
                    for r in ranges
                ),
            )
        self.ranges = ranges
        self._owners = owners(ranges)
        for r in ranges:
            if r.master not in self._known:
                self._known.append(r.master)

    def _healthy(self) -> bool:
        return not uncovered(self.ranges) and not any(self.node(r.master).down for r in self.ranges)

    def _start_ticker(self) -> None:
        if self._ticker is None and not self._closed:
            self._ticker = self.loop().create_task(self._tick())

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_S if self._healthy() else REFRESH_UNHEALTHY_S)
            await self._refresh_quietly()

    # --- whole cluster ------------------------------------------------------------------

    async def masters(self) -> list[PipelinedConnection]:
        if not self.ranges:
            await self.refresh()
        return [self.node(a) for a in dict.fromkeys(r.master for r in self.ranges)]

    async def check(self) -> None:
        await self.refresh()
        gaps = uncovered(self.ranges)
        if gaps:
            text = ", ".join(f"{a}-{b}" for a, b in gaps)
            raise StoreUnavailable(f"redis cluster: slots {text} have no master")
        deadline = time.monotonic() + 1.0
        nodes = await self.masters()
        results = await asyncio.gather(*(n.execute(PING, deadline) for n in nodes), return_exceptions=True)
        down = [n.name for n, r in zip(nodes, results, strict=True) if isinstance(r, BaseException)]
        if down:
            raise StoreUnavailable(f"redis cluster: master {', '.join(down)} does not answer")

    def close(self) -> None:
        self._closed = True
        for task in (self._ticker, self._refresh_task):
            if task is not None:
                task.cancel()
        for node in self._nodes.values():
            node.close()
