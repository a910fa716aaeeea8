"""A pipelining Redis connection for the decision hot path.

Every decision is one EVALSHA. Commands issued by concurrent decisions are written
to the socket together: a write per PIPELINE_CHUNK commands, the rest at the end of
the event-loop turn or, while earlier commands are in flight, once their replies are
in. Replies come back in order, matched to their callers first-in first-out by a
callback per command (no future, no task on the hot path). This is
what a load of concurrent gateway requests needs; redis-py's per-command machinery
(pool checkout, per-call framing, parser objects) costs several times more.

Only the hot path uses it; every other Redis call goes through redis-py.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import hiredis

from sidecar.store.base import StoreUnavailable


class RedisReplyError(Exception):
    """Redis answered with an error reply (e.g. NOSCRIPT): the command did not run."""


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
    def __init__(self, on_lost: Callable[[Exception], None]) -> None:
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
        self.last_reply = 0.0  # monotonic time Redis last sent anything
        self._on_lost = on_lost

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
        if not self.waiting:
            return
        now = time.monotonic()
        expired = []
        for entry in self.waiting:
            on_reply, deadline = entry
            if deadline and now >= deadline and on_reply is not None:
                entry[0] = None
                expired.append(on_reply)
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
        self.reader.feed(data)
        waiting = self.waiting
        while True:
            reply = self.reader.gets()
            if reply is False:
                if self.buffer and len(waiting) == len(self.buffer):
                    self.flush()
                return
            on_reply = waiting.popleft()[0]
            # None: the deadline answered already; the late reply is dropped.
            if on_reply is not None:
                on_reply(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        error = StoreUnavailable(f"redis connection lost: {exc!r}")
        while self.waiting:
            on_reply = self.waiting.popleft()[0]
            if on_reply is not None:
                on_reply(error)
        self._on_lost(error)


def _settle(future: asyncio.Future[Any], reply: Any) -> None:
    """An OnReply that resolves ``future`` (bound with functools.partial)."""
    if future.done():
        return
    if isinstance(reply, BaseException):
        future.set_exception(reply)
    else:
        future.set_result(reply)


class PipelinedConnection:
    """One connection to Redis (host:port or unix socket), opened on first use and
    reopened after a loss. Commands are buffered and flushed once per loop turn."""

    def __init__(self, url: str, connect_timeout_s: float) -> None:
        parsed = urlparse(url)
        self._unix = parsed.path if parsed.scheme == "unix" else None
        self._host = parsed.hostname or "127.0.0.1"
        self._port = parsed.port or 6379
        self._password = unquote(parsed.password) if parsed.password else None
        self._username = unquote(parsed.username) if parsed.username else None
        # redis://host:port/3, or unix:///path/redis.sock?db=3 (redis-py's forms)
        db = parse_qs(parsed.query).get("db", [""])[0] if parsed.scheme == "unix" else parsed.path.lstrip("/")
        self._db = int(db) if db.isdigit() else 0
        self._tls = parsed.scheme == "rediss"
        self._connect_timeout_s = connect_timeout_s
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None

    def _lost(self, error: Exception) -> None:
        self._protocol = None

    async def _connect(self) -> _Protocol:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._protocol is not None:
                return self._protocol
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(self._connect_timeout_s):
                    if self._unix:
                        _, protocol = await loop.create_unix_connection(
                            lambda: _Protocol(self._lost), self._unix
                        )
                    else:
                        _, protocol = await loop.create_connection(
                            lambda: _Protocol(self._lost), self._host, self._port, ssl=self._tls or None
                        )
            except (OSError, TimeoutError) as exc:
                raise StoreUnavailable(f"redis unreachable: {exc!r}") from exc
            # The handshake is queued first, so anything pipelined after it runs after it.
            handshake: list[asyncio.Future[object]] = []
            commands = []
            if self._password is not None:
                auth = [self._username, self._password] if self._username else [self._password]
                commands.append(encode_command(["AUTH", *auth]))
            if self._db:
                commands.append(encode_command(["SELECT", self._db]))
            for command in commands:
                future: asyncio.Future[object] = loop.create_future()
                protocol.send(command, functools.partial(_settle, future))
                handshake.append(future)
            try:
                for step in handshake:
                    await step
            except RedisReplyError as exc:
                protocol.transport.close()
                raise StoreUnavailable(f"redis refused the connection: {exc}") from exc
            self._protocol = protocol
            return protocol

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The connection's event loop; None while not connected."""
        protocol = self._protocol
        return None if protocol is None else protocol.loop

    def send(self, command: bytes, on_reply: OnReply, deadline: float = 0.0) -> bool:
        """Queue ``command`` when connected (the hot path: no coroutine, no future);
        False, having done nothing, when ``execute`` must connect first."""
        protocol = self._protocol
        if protocol is None:
            return False
        protocol.send(command, on_reply, deadline)
        return True

    async def execute(self, command: bytes, deadline: float = 0.0) -> object:
        """Send one encoded command (encode_command) and wait for its reply
        (RedisReplyError for an error reply, StoreUnavailable when the connection is
        down or lost, TimeoutError once ``deadline``, in time.monotonic(), has passed)."""
        protocol = self._protocol
        if protocol is None:
            timeout = None if not deadline else max(0.0, deadline - time.monotonic())
            async with asyncio.timeout(timeout):
                protocol = await self._connect()
        future: asyncio.Future[object] = protocol.loop.create_future()
        protocol.send(command, functools.partial(_settle, future), deadline)
        return await future

    def answered_within(self, seconds: float) -> bool:
        """Whether Redis sent anything on this connection in the last ``seconds``."""
        protocol = self._protocol
        return protocol is not None and time.monotonic() - protocol.last_reply <= seconds

    def close(self) -> None:
        protocol = self._protocol
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()
        self._protocol = None
