"""The decision port: a minimal HTTP/1.1 server for the two decision endpoints.

Gateways call the sidecar once per proxied request, so this path is where speed
matters. A general ASGI stack (uvicorn + Starlette) spends most of a decision's time
on request and response objects; this server parses with httptools, calls the same
handlers as the main port (decisions.decide_v1 / decide_apigee, so the answers are
identical), and writes the response bytes itself. It serves:

    POST /v1/authorize                  POST /integrations/apigee/authorize
    GET  /healthz

Everything else (admin, metrics, usage) stays on the main port. HTTP/1.1 keep-alive
and pipelining are supported: responses leave in request order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import httptools

from sidecar.authorizer import Authorizer
from sidecar.config import Settings
from sidecar.core.errors import InvalidInput
from sidecar.http.decisions import Answer, decide_apigee, decide_v1
from sidecar.http.errors import error_body
from sidecar.store.base import Store

log = logging.getLogger("aforo.http")
Handler = Callable[[Authorizer, bytes], Awaitable[Answer]]
_ROUTES: dict[bytes, Handler] = {
    b"/v1/authorize": decide_v1,
    b"/integrations/apigee/authorize": decide_apigee,
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
        self.previous: asyncio.Future[None] | None = None  # the last response's turn
        self.in_flight = 0
        self.paused = False
        self.tasks: set[asyncio.Future[None]] = set()

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
        handler = _ROUTES.get(path)
        if handler is not None and method == b"POST":
            if self.too_large:
                body = error_body("body_too_large", f"request body exceeds {self.max_body} bytes")
                self._reply_now(413, body, False)
                return
            self._start(handler, b"".join(self.body), keep_alive)
        elif path == b"/healthz" and method == b"GET":
            self._reply_now(200, b'{"status":"ok"}', keep_alive)
        elif handler is not None or path == b"/healthz":
            self._reply_now(405, error_body("method_not_allowed", "Method Not Allowed"), keep_alive)
        else:
            message = "the decision port serves only the decision endpoints"
            self._reply_now(404, error_body("not_found", message), keep_alive)

    # --- responses, in request order ----------------------------------------------

    def _reply_now(self, status: int, body: bytes, keep_alive: bool) -> None:
        self._start(None, b"", keep_alive, (status, body, None))

    def _start(
        self,
        handler: Handler | None,
        body: bytes,
        keep_alive: bool,
        ready: tuple[int, bytes, int | None] | None = None,
    ) -> None:
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        previous, self.previous = self.previous, turn
        self.in_flight += 1
        if self.in_flight >= _MAX_IN_FLIGHT and self.transport is not None and not self.paused:
            self.transport.pause_reading()
            self.paused = True
        # The loop holds tasks only weakly: keep each until it is done.
        task = asyncio.ensure_future(self._respond(handler, body, ready, previous, turn, keep_alive))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _respond(
        self,
        handler: Handler | None,
        body: bytes,
        ready: tuple[int, bytes, int | None] | None,
        previous: asyncio.Future[None] | None,
        turn: asyncio.Future[None],
        keep_alive: bool,
    ) -> None:
        try:
            if handler is None:
                assert ready is not None
                status, payload, retry_after = ready
            else:
                try:
                    answer = await handler(self.authorizer, body)
                    status, payload, retry_after = answer.status, answer.body, answer.retry_after
                except InvalidInput as exc:
                    status, payload, retry_after = 400, error_body(exc.code, exc.message, exc.field), None
                except Exception:
                    log.exception("unhandled error on the decision port")
                    status, retry_after = 500, None
                    payload = error_body("internal_error", "internal error; see the sidecar's log")
            if previous is not None and not previous.done():
                await previous
            transport = self.transport
            if transport is not None and not transport.is_closing():
                transport.write(_http_response(status, payload, retry_after, keep_alive))
                if not keep_alive:
                    transport.close()
        finally:
            turn.set_result(None)
            self.in_flight -= 1
            if self.paused and self.in_flight < _MAX_IN_FLIGHT // 2 and self.transport is not None:
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
