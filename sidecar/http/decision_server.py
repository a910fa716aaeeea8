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

Hostile input is cut off early, and the connection closed: a request line longer than
``MAX_URL_BYTES`` (414), headers larger than ``MAX_HEADER_BYTES`` in all (431), a declared
``Content-Length`` over the body limit (413, answered when the headers end, without
waiting for the body), and a request not received whole within ``REQUEST_TIMEOUT_S`` of
its first byte (slowloris: the connection is closed without an answer). A request that
arrives in one read, as a gateway's does, never starts a timer.
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
from sidecar.core.models import AuthorizeRequest
from sidecar.gateway_tokens import INVALID, MISSING, REFUSALS
from sidecar.http.decisions import APIGEE, V1, DecisionRoute
from sidecar.http.errors import error_body
from sidecar.store.base import Store
from sidecar.tls import server_context

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
    414: b"URI Too Long",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}
# Requests of one connection in flight at once before reading pauses (pipelining).
_MAX_IN_FLIGHT = 64
MAX_URL_BYTES = 8 * 1024
MAX_HEADER_BYTES = 16 * 1024  # names and values of all headers of a request
REQUEST_TIMEOUT_S = 5.0  # from a request's first byte to its last


def http_response(
    status: int, body: bytes, retry_after: int | None, keep_alive: bool, headers: bytes = b""
) -> bytes:
    """``headers``: more header lines, each ending in CRLF."""
    head = b"HTTP/1.1 %d %b\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%b" % (
        status,
        _REASONS.get(status, b"Unknown"),
        len(body),
        headers,
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
    return http_response(500, body, None, keep_alive)


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
        connection.ready(self, http_response(answer.status, answer.body, answer.retry_after, self.keep_alive))


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
        self.header_bytes = 0
        self.declared = 0  # Content-Length of the request being read
        self.in_message = False  # a request has begun and is not complete
        self.refused = False  # an oversized request was answered: read nothing more
        self.slow_timer: asyncio.TimerHandle | None = None
        self.auth: str | None = None  # the Authorization header of the request being read
        self.gateway = authorizer.gateway_tokens

    # --- asyncio.Protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reply_now(400, error_body("bad_request", "protocol upgrades are not supported"), False)
        except httptools.HttpParserError as exc:
            if not self.refused:
                self._reply_now(400, error_body("bad_request", f"malformed HTTP request: {exc}"), False)
        if self.in_message and self.slow_timer is None and not self.refused:
            # Part of a request is in, the rest is not: it has REQUEST_TIMEOUT_S.
            loop = asyncio.get_running_loop()
            self.slow_timer = loop.call_later(REQUEST_TIMEOUT_S, self._too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._stop_timer()

    def _stop_timer(self) -> None:
        if self.slow_timer is not None:
            self.slow_timer.cancel()
            self.slow_timer = None

    def _too_slow(self) -> None:
        self.slow_timer = None
        if self.in_message and self.transport is not None:
            log.info("decision port: a request took over %.0f s to arrive; closed", REQUEST_TIMEOUT_S)
            self.refused = True
            self.transport.close()

    def _refuse(self, status: int, body: bytes) -> None:
        """Answer an oversized request and read nothing more from this connection (its
        rest may be megabytes): httptools stops at the raised error."""
        self.refused = True
        self._stop_timer()
        self._reply_now(status, body, False)
        if self.transport is not None:
            self.transport.pause_reading()
        raise httptools.HttpParserError(f"refused with {status}")

    # --- httptools callbacks -------------------------------------------------------

    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []
        self.size = 0
        self.too_large = False
        self.header_bytes = 0
        self.declared = 0
        self.in_message = True
        self.auth = None

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > MAX_URL_BYTES:
            self._refuse(414, error_body("uri_too_long", f"the request line is over {MAX_URL_BYTES} bytes"))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value)
        if self.header_bytes > MAX_HEADER_BYTES:
            message = f"the request's headers are over {MAX_HEADER_BYTES} bytes"
            self._refuse(431, error_body("headers_too_large", message))
        lowered = name.lower()
        if lowered == b"content-length" and value.strip().isdigit():
            self.declared = int(value)
        elif lowered == b"authorization":
            self.auth = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        if self.declared > self.max_body:
            self._refuse(413, error_body("body_too_large", f"request body exceeds {self.max_body} bytes"))

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > self.max_body:
            self.too_large = True
        elif not self.too_large:
            self.body.append(body)

    def on_message_complete(self) -> None:
        self.in_message = False
        self._stop_timer()
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
            # RFC 9110: a 405 names the methods the resource takes.
            allow = b"allow: POST\r\n" if route is not None else b"allow: GET\r\n"
            body = error_body("method_not_allowed", "Method Not Allowed")
            self.ready(self._queue(keep_alive), http_response(405, body, None, keep_alive, allow))
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
        self.ready(self._queue(keep_alive), http_response(status, body, None, keep_alive))

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
        refused = self.gateway.check_now(self.auth, request.tenant)
        if refused is False:
            # This process does not hold the token yet: look it up, then decide (the
            # reply keeps its place in the connection's order meanwhile).
            task = asyncio.ensure_future(self.gateway.check(self.auth, request.tenant))
            task.add_done_callback(lambda done: self._checked(reply, request, done))
            return
        self._begin(reply, request, refused)

    def _checked(self, reply: _Reply, request: AuthorizeRequest, done: asyncio.Future[str | None]) -> None:
        try:
            refused = done.result()
        except Exception:
            self.ready(reply, _internal_error(reply.keep_alive))
            return
        self._begin(reply, request, refused)

    def _begin(self, reply: _Reply, request: AuthorizeRequest, refused: str | None) -> None:
        if refused is not None:
            if refused == MISSING:
                body = error_body("gateway_token_required", REFUSALS[MISSING])
            else:
                body = error_body("unauthorized", REFUSALS[INVALID])
            self.ready(reply, http_response(401, body, None, reply.keep_alive))
            return
        try:
            pending = reply.pending = self.authorizer.begin(request)
        except Exception:
            self.ready(reply, _internal_error(reply.keep_alive))
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
        ssl=server_context(settings),
    )
    port = server.sockets[0].getsockname()[1]
    log.info("decision port listening on %s:%d", settings.host, port)
    try:
        yield port
    finally:
        server.close()
        await server.wait_closed()
