"""A pipelining Redis connection for the decision hot path.

Every decision is one EVALSHA. Commands issued by concurrent decisions in the same
event-loop turn are written to the socket together (one write, one Redis read), and
replies come back in order, matched to their callers first-in first-out. This is
what a load of concurrent gateway requests needs; redis-py's per-command machinery
(pool checkout, per-call framing, parser objects) costs several times more.

Only the hot path uses it; every other Redis call goes through redis-py.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Sequence
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


class _Protocol(asyncio.Protocol):
    def __init__(self, on_lost: collections.abc.Callable[[Exception], None]) -> None:
        self.reader = hiredis.Reader(replyError=RedisReplyError)
        # (future, deadline in loop time or 0), in the order the replies will come.
        self.waiting: collections.deque[tuple[asyncio.Future[object], float]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.buffer: list[bytes] = []
        self.flush_scheduled = False
        self.sweep_scheduled = False
        self.last_reply = 0.0  # monotonic time Redis last sent anything
        self._on_lost = on_lost

    def send(self, command: bytes, deadline: float = 0.0) -> asyncio.Future[object]:
        """Queue an encoded command; all commands queued in this loop turn go out in
        one write. Past ``deadline`` (loop time) the future fails with TimeoutError;
        the reply, when it comes, is dropped."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[object] = loop.create_future()
        self.waiting.append((future, deadline))
        self.buffer.append(command)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            loop.call_soon(self.flush)
        if deadline and not self.sweep_scheduled:
            self.sweep_scheduled = True
            loop.call_later(SWEEP_S, self.sweep)
        return future

    def sweep(self) -> None:
        """Fail the futures whose deadline has passed (their commands stay queued:
        the replies must still be matched in order)."""
        self.sweep_scheduled = False
        if not self.waiting:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        for future, deadline in self.waiting:
            if deadline and now >= deadline and not future.done():
                future.set_exception(TimeoutError())
        self.sweep_scheduled = True
        loop.call_later(SWEEP_S, self.sweep)

    def flush(self) -> None:
        self.flush_scheduled = False
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
                return
            future, _ = waiting.popleft()
            # A caller that gave up (deadline) leaves its future done; the reply
            # still arrives, in order, and is dropped here.
            if not future.done():
                if isinstance(reply, RedisReplyError):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        error = StoreUnavailable(f"redis connection lost: {exc!r}")
        while self.waiting:
            future, _ = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)
        self._on_lost(error)


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
            handshake = []
            if self._password is not None:
                auth = [self._username, self._password] if self._username else [self._password]
                handshake.append(protocol.send(encode_command(["AUTH", *auth])))
            if self._db:
                handshake.append(protocol.send(encode_command(["SELECT", self._db])))
            try:
                for step in handshake:
                    await step
            except RedisReplyError as exc:
                protocol.transport.close()
                raise StoreUnavailable(f"redis refused the connection: {exc}") from exc
            self._protocol = protocol
            return protocol

    def send(self, command: bytes, deadline: float = 0.0) -> asyncio.Future[object] | None:
        """The reply's future when connected (no coroutine in between, for the hot
        path), None when ``execute`` must connect first."""
        protocol = self._protocol
        return None if protocol is None else protocol.send(command, deadline)

    async def execute(self, command: bytes, deadline: float = 0.0) -> object:
        """Send one encoded command (encode_command) and wait for its reply
        (RedisReplyError for an error reply, StoreUnavailable when the connection is
        down or lost, TimeoutError once ``deadline``, in loop time, has passed)."""
        protocol = self._protocol
        if protocol is None:
            timeout = None if not deadline else max(0.0, deadline - asyncio.get_running_loop().time())
            async with asyncio.timeout(timeout):
                protocol = await self._connect()
        return await protocol.send(command, deadline)

    def answered_within(self, seconds: float) -> bool:
        """Whether Redis sent anything on this connection in the last ``seconds``."""
        protocol = self._protocol
        return protocol is not None and time.monotonic() - protocol.last_reply <= seconds

    def close(self) -> None:
        protocol = self._protocol
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()
        self._protocol = None
