"""The decision port: a minimal HTTP/1.1 server for the two decision endpoints.

Gateways call the sidecar once per proxied request, so this path is where speed
matters. A general ASGI stack (uvicorn + Starlette) spends most of a decision's time
on request and response objects; this server parses with httptools, calls the same
routes as the main port (decisions.V1 / APIGEE, so the answers are identical), and
writes the response bytes itself. A decision is begun when its request is parsed and
answered from a done callback of the store's future: no task, no coroutine per
request. It serves:

    POST /v1/authorize                  POST /integrations/apigee/authorize
    GET  /healthz

Everything else (admin, metrics, usage) stays on the main port. HTTP/1.1 keep-alive
and pipelining are supported: responses leave in request order.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator

import httptools

from sidecar.authorizer import Authorizer, Pending
from sidecar.config import Settings
from sidecar.core.errors import InvalidInput
from sidecar.http.decisions import APIGEE, V1, DecisionRoute
from sidecar.http.errors import error_body
from sidecar.store.base import Store

log = logging.getLogger("aforo.http")
_ROUTES: dict[bytes, DecisionRoute] = {
    b"/v1/authorize": V1,
    b"/integrations/apigee/authorize": APIGEE,
}
_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    401: b"Unauthorized",
    402: b"Payment Required",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    413: b"Content Too Large",
    429: b"Too Many Requests",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}
# Requests of one connection in flight at once before reading pauses (pipelining).
_MAX_IN_FLIGHT = 64


def _http_response(status: int, body: bytes, retry_after: int | None, keep_alive: bool) -> bytes:
    head = b"HTTP/1.1 %d %b\r\ncontent-type: application/json\r\ncontent-length: %d\r\n" % (
        status,
        _REASONS.get(status, b"Unknown"),
        len(body),
    )
    if retry_after is not None:
        head += b"retry-after: %d\r\n" % retry_after
    if not keep_alive:
        head += b"connection: close\r\n"
    return head + b"\r\n" + body


def _internal_error(keep_alive: bool) -> bytes:
    """The 500 response of a bug, logged with its traceback (call from an except)."""
    log.exception("unhandled error on the decision port")
    body = error_body("internal_error", "internal error; see the sidecar's log")
    return _http_response(500, body, None, keep_alive)


class _Reply:
    """One response of a connection, in request order; ``data`` is None until ready."""

    __slots__ = ("connection", "data", "keep_alive", "pending", "route")

    def __init__(self, connection: _Connection, keep_alive: bool) -> None:
        self.connection = connection
        self.keep_alive = keep_alive
        self.data: bytes | None = None
        self.pending: Pending | None = None
        self.route: DecisionRoute | None = None

    def decided(self, _: object = None) -> None:
        """The store's future is done (a done callback), or was done at once."""
        connection = self.connection
        route, pending = self.route, self.pending
        assert route is not None and pending is not None
        self.pending = None
        try:
            answer = route.render(connection.authorizer.conclude(pending))
        except Exception:
            connection.ready(self, _internal_error(self.keep_alive))
            return
        connection.ready(
            self, _http_response(answer.status, answer.body, answer.retry_after, self.keep_alive)
        )


class _Connection(asyncio.Protocol):
    def __init__(self, authorizer: Authorizer, max_body: int) -> None:
        self.authorizer = authorizer
        self.max_body = max_body
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []
        self.size = 0
        self.too_large = False
        self.replies: collections.deque[_Reply] = collections.deque()  # oldest first
        self.paused = False

    # --- asyncio.Protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reply_now(400, error_body("bad_request", "protocol upgrades are not supported"), False)
        except httptools.HttpParserError as exc:
            self._reply_now(400, error_body("bad_request", f"malformed HTTP request: {exc}"), False)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    # --- httptools callbacks -------------------------------------------------------

    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []
        self.size = 0
        self.too_large = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > self.max_body:
            self.too_large = True
        elif not self.too_large:
            self.body.append(body)

    def on_message_complete(self) -> None:
        keep_alive = self.parser.should_keep_alive()
        method = self.parser.get_method()
        path = self.url.split(b"?", 1)[0]
        route = _ROUTES.get(path)
        if route is not None and method == b"POST":
            if self.too_large:
                body = error_body("body_too_large", f"request body exceeds {self.max_body} bytes")
                self._reply_now(413, body, False)
                return
            self._decide(route, b"".join(self.body), keep_alive)
        elif path == b"/healthz" and method == b"GET":
            self._reply_now(200, b'{"status":"ok"}', keep_alive)
        elif route is not None or path == b"/healthz":
            self._reply_now(405, error_body("method_not_allowed", "Method Not Allowed"), keep_alive)
        else:
            message = "the decision port serves only the decision endpoints"
            self._reply_now(404, error_body("not_found", message), keep_alive)

    # --- responses, in request order ----------------------------------------------

    def _queue(self, keep_alive: bool) -> _Reply:
        reply = _Reply(self, keep_alive)
        self.replies.append(reply)
        if len(self.replies) >= _MAX_IN_FLIGHT and self.transport is not None and not self.paused:
            self.transport.pause_reading()
            self.paused = True
        return reply

    def _reply_now(self, status: int, body: bytes, keep_alive: bool) -> None:
        self.ready(self._queue(keep_alive), _http_response(status, body, None, keep_alive))

    def _decide(self, route: DecisionRoute, body: bytes, keep_alive: bool) -> None:
        try:
            request = route.parse(body)
        except InvalidInput as exc:
            self._reply_now(400, error_body(exc.code, exc.message, exc.field), keep_alive)
            return
        except Exception:
            self.ready(self._queue(keep_alive), _internal_error(keep_alive))
            return
        reply = self._queue(keep_alive)
        reply.route = route
        try:
            pending = reply.pending = self.authorizer.begin(request)
        except Exception:
            self.ready(reply, _internal_error(keep_alive))
            return
        future = pending.future
        if future.done():
            reply.decided()
        else:
            future.add_done_callback(reply.decided)

    def ready(self, reply: _Reply, data: bytes) -> None:
        """``reply`` is ready: send it and every ready one queued after it, unless an
        earlier response is still being decided."""
        reply.data = data
        replies = self.replies
        while replies and replies[0].data is not None:
            done = replies.popleft()
            transport = self.transport
            if transport is not None and not transport.is_closing():
                transport.write(done.data)  # type: ignore[arg-type]
                if not done.keep_alive:
                    transport.close()
        if self.paused and len(replies) < _MAX_IN_FLIGHT // 2 and self.transport is not None:
            self.transport.resume_reading()
            self.paused = False


@contextlib.asynccontextmanager
async def decision_server(settings: Settings, authorizer: Authorizer, store: Store) -> AsyncIterator[int]:
    """Serve the decision port for the life of the block; yields the bound port.
    Several workers share the port through SO_REUSEPORT."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _Connection(authorizer, settings.max_body_bytes),
        settings.host,
        settings.decision_port,
        reuse_port=settings.workers > 1,
        backlog=4096,
    )
    port = server.sockets[0].getsockname()[1]
    log.info("decision port listening on %s:%d", settings.host, port)
    try:
        yield port
    finally:
        server.close()
        await server.wait_closed()
