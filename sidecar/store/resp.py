"""A pipelining Redis connection for the decision hot path.

Every decision is one EVALSHA. Commands issued by concurrent decisions are written
to the socket together: a write per PIPELINE_CHUNK commands, the rest at the end of
the event-loop turn or, while earlier commands are in flight, once their replies are
in. Replies come back in order, matched to their callers first-in first-out by a
callback per command (no future, no task on the hot path). This is
what a load of concurrent gateway requests needs; redis-py's per-command machinery
(pool checkout, per-call framing, parser objects) costs several times more.

One PipelinedConnection talks to one Redis node; routing.py puts one per node behind
the store (one for a standalone Redis or a Sentinel primary, one per cluster master).
Each carries the breaker of its node: a refused or lost connection, or several missed
deadlines while the node sends nothing, make its commands fail at once for a cooldown
instead of each waiting out its deadline. Only the hot path uses it (and the cluster
topology reads); every other Redis call goes through redis-py.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import hiredis

from sidecar import metrics
from sidecar.store.base import StoreDown, StoreUnavailable
from sidecar.store.target import Address, RedisTarget


class RedisReplyError(Exception):
    """Redis answered with an error reply (e.g. NOSCRIPT): the command did not run."""


# Error replies that say the node cannot serve the command now (it did not run): the
# caller gets StoreUnavailable, i.e. its fail mode, never a 500. READONLY also drops
# the connection: it reached a replica (a Sentinel failover demoted its primary), and
# the next connection looks the primary up again.
log = logging.getLogger("aforo.store")
TRANSIENT_ERRORS = ("READONLY", "LOADING", "MASTERDOWN", "CLUSTERDOWN", "BUSY")
# Consecutive missed deadlines, with nothing heard from the node for MISSED_QUIET_S,
# that open the breaker (a refused or lost connection opens it at once). Deadlines
# missed while the node still answers are this process being slow, not the node gone.
BREAKER_MISSES = 3
MISSED_QUIET_S = 0.2


def encode_bulks(args: Sequence[bytes | str | int]) -> bytes:
    """RESP bulk strings of ``args``, without the array header (see encode_command)."""
    parts = []
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode()
        elif isinstance(arg, int):
            arg = b"%d" % arg
        parts.append(b"$%d\r\n%b\r\n" % (len(arg), arg))
    return b"".join(parts)


def encode_command(args: Sequence[bytes | str | int]) -> bytes:
    return b"*%d\r\n" % len(args) + encode_bulks(args)


# How often pending commands are checked against their deadlines: a deadline is kept
# to within this much (one timer per connection instead of one per command).
SWEEP_S = 0.005
# Commands queued in one loop turn go out in chunks of this many, not all at the end
# of the turn: Redis then runs the first decisions while this process still parses
# the requests behind them, instead of each waiting for the other. Measured with 32
# connections on 2 cores (wrk, loadtests/benchmark.py's load): one write per turn
# 6.6-6.8k decisions/s; chunks of 12 8.3-9.4k; with the hold of _end_of_turn, chunks
# of 2, 4, 6, 8, 12, 32 gave 7.5k, 8.2k, 8.5k, 7.9k, 8.0k, 5.9k on average.
PIPELINE_CHUNK = 6

# Called once with a command's reply: a value, or an exception instance
# (RedisReplyError for an error reply, TimeoutError past the deadline,
# StoreUnavailable when the connection is lost).
OnReply = Callable[[Any], None]


class _Protocol(asyncio.Protocol):
    def __init__(self, node: PipelinedConnection) -> None:
        # Kept: asyncio.get_running_loop() costs a getpid() system call on every call.
        self.loop = asyncio.get_running_loop()
        self.reader = hiredis.Reader(replyError=RedisReplyError)
        # [on_reply, deadline (time.monotonic(), 0: none)], in the order replies will
        # come; on_reply is None once the deadline has answered for it.
        self.waiting: collections.deque[list[Any]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.buffer: list[bytes] = []
        self.flush_scheduled = False
        self.sweep_scheduled = False
        self.last_reply = 0.0  # monotonic time the node last sent anything
        self.missed = 0  # deadlines missed since the node last sent anything
        self.last_sweep = 0.0
        self._node = node

    def send(self, command: bytes, on_reply: OnReply, deadline: float = 0.0) -> None:
        """Queue an encoded command: it goes out with the commands queued beside it
        (see PIPELINE_CHUNK and _end_of_turn). Past ``deadline`` (time.monotonic())
        on_reply gets TimeoutError and the reply, when it comes, is dropped."""
        self.waiting.append([on_reply, deadline])
        self.buffer.append(command)
        if len(self.buffer) >= PIPELINE_CHUNK:
            self.flush()
        elif not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._end_of_turn)
        if deadline and not self.sweep_scheduled:
            self.sweep_scheduled = True
            self.loop.call_later(SWEEP_S, self.sweep)

    def sweep(self) -> None:
        """Time out the commands whose deadline has passed (they stay queued: the
        replies must still be matched in order)."""
        self.sweep_scheduled = False
        now = time.monotonic()
        # A sweep much later than SWEEP_S means this process's loop stalled: replies
        # may be waiting unread in the socket, so the node's silence proves nothing.
        stalled = now - self.last_sweep > MISSED_QUIET_S / 2
        self.last_sweep = now
        if not self.waiting:
            return
        expired = []
        for entry in self.waiting:
            on_reply, deadline = entry
            if deadline and now >= deadline and on_reply is not None:
                entry[0] = None
                expired.append(on_reply)
        if expired:
            self.missed += len(expired)
            if self.missed >= BREAKER_MISSES and now - self.last_reply > MISSED_QUIET_S and not stalled:
                self._node.trip()
        # Called once the scan is over: an on_reply may queue a command.
        for on_reply in expired:
            on_reply(TimeoutError())
        self.sweep_scheduled = True
        self.loop.call_later(SWEEP_S, self.sweep)

    def _end_of_turn(self) -> None:
        """Send what this turn queued, unless commands are still in flight: then it is
        held until their replies are in (data_received sends it): fewer, fuller
        writes (Nagle's rule). Measured in alternation at 32 connections: HTTP 8.7k
        against 7.7-8.2k decisions/s, gRPC unary 1.7-1.9k against 1.5-1.6k calls/s."""
        self.flush_scheduled = False
        if len(self.waiting) == len(self.buffer):
            self.flush()

    def flush(self) -> None:
        self.flush_scheduled = False
        if not self.buffer:
            return
        data, self.buffer = b"".join(self.buffer), []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.last_reply = time.monotonic()
        self.missed = 0
        self.reader.feed(data)
        waiting = self.waiting
        while True:
            reply = self.reader.gets()
            if reply is False:
                if self.buffer and len(waiting) == len(self.buffer):
                    self.flush()
                return
            if reply.__class__ is RedisReplyError:
                reply = self._classify(reply)
            on_reply = waiting.popleft()[0]
            # None: the deadline answered already; the late reply is dropped.
            if on_reply is not None:
                try:
                    on_reply(reply)
                except Exception:
                    # A bug in one callback must not take the connection (and every
                    # command queued on it) down, nor leave the rest of this read unread.
                    log.exception("redis %s: a reply callback failed", self._node.name)

    def _classify(self, reply: RedisReplyError) -> Exception:
        text = str(reply)
        if not text.startswith(TRANSIENT_ERRORS):
            return reply
        if text.startswith("READONLY") and self.transport is not None:
            self.transport.close()
        return StoreUnavailable(f"redis {self._node.name}: {text}")

    def connection_lost(self, exc: Exception | None) -> None:
        error = StoreUnavailable(f"redis {self._node.name} connection lost: {exc!r}")
        self._node.lost(self)
        while self.waiting:
            on_reply = self.waiting.popleft()[0]
            if on_reply is not None:
                on_reply(error)


def ignore_reply(reply: object) -> None:
    """OnReply of a command whose answer nobody waits for (ASKING, a SCRIPT LOAD: a
    failure shows in the reply to the command sent after it)."""


def settle(future: asyncio.Future[Any], reply: Any) -> None:
    """An OnReply that resolves ``future`` (bound with functools.partial)."""
    if future.done():
        return
    if isinstance(reply, BaseException):
        future.set_exception(reply)
    else:
        future.set_result(reply)


class PipelinedConnection:
    """One connection to one Redis node, opened on first use and reopened after a
    loss (after the breaker's cooldown). ``locate`` names the node when it cannot be
    fixed in advance (the Sentinel primary): it is asked again on every connect."""

    def __init__(
        self,
        target: RedisTarget,
        address: Address | None,
        connect_timeout_s: float,
        cooldown_s: float = 0.0,
        locate: Callable[[], Awaitable[Address]] | None = None,
        on_lost: Callable[[PipelinedConnection], None] | None = None,
    ) -> None:
        self._target = target
        self.address = address
        self.name = target.unix_path or (f"{address[0]}:{address[1]}" if address else "primary")
        self._locate = locate
        self._connect_timeout_s = connect_timeout_s
        self._cooldown_s = cooldown_s
        self._on_lost = on_lost
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None
        self._closed = False
        # The breaker: until this time.monotonic() commands fail at once (StoreDown).
        self.down_until = 0.0

    def trip(self) -> None:
        """Open the breaker: for the cooldown, spare the node a connection attempt or
        a deadline per command. The first command after it probes the node again."""
        if self._cooldown_s:
            self.down_until = time.monotonic() + self._cooldown_s
            metrics.store_breaker(self.name, True)

    def lost(self, protocol: _Protocol) -> None:
        if self._protocol is protocol:
            self._protocol = None
        if not self._closed:
            self.trip()
            if self._on_lost is not None:
                self._on_lost(self)

    @property
    def down(self) -> bool:
        """The breaker is open (no I/O)."""
        return self.down_until != 0.0 and time.monotonic() < self.down_until

    async def connect(self) -> _Protocol:
        """The open connection, opening it if needed (StoreDown while the breaker is
        open, StoreUnavailable when the node cannot be reached or refuses us)."""
        protocol = self._protocol
        if protocol is not None:
            return protocol
        if self.down:
            raise StoreDown(f"redis {self.name} is down (breaker open)")
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._protocol is not None:
                return self._protocol
            try:
                protocol = await self._open()
            except StoreUnavailable:
                self.trip()
                raise
            self._protocol = protocol
            self._closed = False
            if self._cooldown_s:  # connected: the node answers (also the gauge's first value)
                metrics.store_breaker(self.name, False)
            return protocol

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        target = self._target
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                if self._locate is not None:
                    self.address = await self._locate()
                if target.unix_path:
                    _, protocol = await loop.create_unix_connection(lambda: _Protocol(self), target.unix_path)
                else:
                    assert self.address is not None
                    host, port = self.address
                    _, protocol = await loop.create_connection(
                        lambda: _Protocol(self), host, port, ssl=target.tls or None
                    )
        except (OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"redis {self.name} unreachable: {exc!r}") from exc
        # The handshake is queued first, so anything pipelined after it runs after it.
        handshake: list[asyncio.Future[object]] = []
        commands = []
        if target.password is not None:
            auth = [target.username, target.password] if target.username else [target.password]
            commands.append(encode_command(["AUTH", *auth]))
        if target.db:
            commands.append(encode_command(["SELECT", target.db]))
        if self._locate is not None:
            # A primary named by Sentinel must still be one when we reach it.
            commands.append(encode_command(["ROLE"]))
        for command in commands:
            future: asyncio.Future[object] = loop.create_future()
            protocol.send(command, functools.partial(settle, future))
            handshake.append(future)
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                replies = [await step for step in handshake]
        except (RedisReplyError, StoreUnavailable, TimeoutError) as exc:
            protocol.transport.close()
            raise StoreUnavailable(f"redis {self.name} refused the connection: {exc}") from exc
        if self._locate is not None and replies[-1][0] != b"master":
            protocol.transport.close()
            raise StoreUnavailable(f"redis {self.name} is not a primary (role {replies[-1][0]!r})")
        return protocol

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The connection's event loop; None while not connected."""
        protocol = self._protocol
        return None if protocol is None else protocol.loop

    def send(self, command: bytes, on_reply: OnReply, deadline: float = 0.0) -> bool:
        """Queue ``command`` when connected (the hot path: no coroutine, no future);
        False, having done nothing, when ``connect`` must run first. While the breaker
        is open, on_reply gets StoreDown at once."""
        if self.down_until:
            if time.monotonic() < self.down_until:
                on_reply(StoreDown(f"redis {self.name} is down (breaker open)"))
                return True
            self.down_until = 0.0  # half open: this command tries the node again
            metrics.store_breaker(self.name, False)
        protocol = self._protocol
        if protocol is None:
            return False
        protocol.send(command, on_reply, deadline)
        return True

    async def send_connecting(self, command: bytes, on_reply: OnReply, deadline: float = 0.0) -> None:
        """``send`` once connected; the connection's failure goes to on_reply (and
        TimeoutError once ``deadline`` has passed while connecting)."""
        try:
            timeout = None if not deadline else max(0.0, deadline - time.monotonic())
            async with asyncio.timeout(timeout):
                protocol = await self.connect()
        except (StoreUnavailable, TimeoutError) as exc:
            on_reply(exc)
            return
        if not self.send(command, on_reply, deadline):  # lost again meanwhile
            on_reply(StoreUnavailable(f"redis {self.name} connection lost while connecting"))
        del protocol

    async def execute(self, command: bytes, deadline: float = 0.0) -> object:
        """Send one encoded command (encode_command) and wait for its reply
        (RedisReplyError for an error reply, StoreUnavailable when the node is down or
        the connection lost, TimeoutError once ``deadline``, in time.monotonic(), has
        passed)."""
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        on_reply = functools.partial(settle, future)
        if not self.send(command, on_reply, deadline):
            await self.send_connecting(command, on_reply, deadline)
        return await future

    def close(self) -> None:
        self._closed = True
        if self._cooldown_s:  # a node dropped from the topology must not stay "open"
            metrics.store_breaker(self.name, False)
        protocol = self._protocol
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()
        self._protocol = None
