"""The HTTP port's protocol: uvicorn's httptools protocol with the decision port's
limits on hostile input (sidecar/http/decision_server.py), so neither port can be held
open or made to buffer without bound:

- a request line over ``MAX_URL_BYTES`` is answered 414 ``uri_too_long``, headers over
  ``MAX_HEADER_BYTES`` in all 431 ``headers_too_large``, and the connection is closed
  without reading the rest;
- a new connection must send within ``REQUEST_TIMEOUT_S``; a request's line and headers
  must arrive within ``REQUEST_TIMEOUT_S`` of its first byte, and its body, when it has
  one, at ``BODY_FLOOR_BYTES_PER_S`` at least (``REQUEST_TIMEOUT_S`` plus its length at
  that rate; a chunked body of unknown length gets ``CHUNKED_BODY_TIMEOUT_S``); past
  either the connection is closed (slowloris). As on the decision port, a request that
  arrives in one read costs no timer: one is set only when a read leaves it incomplete.

uvicorn's own keep-alive timeout still closes a connection idle between requests.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from sidecar.core.digits import digits
from sidecar.http.decision_server import MAX_HEADER_BYTES, MAX_URL_BYTES, REQUEST_TIMEOUT_S, http_response
from sidecar.http.errors import error_body

log = logging.getLogger("aforo.http")

BODY_FLOOR_BYTES_PER_S = 64 * 1024
CHUNKED_BODY_TIMEOUT_S = 60.0


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._refused = False
        self._deadline: asyncio.TimerHandle | None = None
        self._header_bytes = 0
        self._in_head = False  # a request's line and headers are coming
        self._began = 0.0  # when its first byte came (loop time)
        self._content_length = 0
        self._chunked = False
        self._body_deadline: float | None = None  # loop time by which its body must be in

    # --- the deadline of what is being received -------------------------------------

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(max(seconds, 0.0), self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            log.info("HTTP port: a request (or a connection's first one) too slow to arrive; closed")
            self._refused = True
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # A connection that sends nothing is held to a request head's limit too.
        self._arm(REQUEST_TIMEOUT_S)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    # --- refusing oversized input ---------------------------------------------------

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer, close, and stop the parser (httptools stops at the raised error;
        ``send_400_response`` then answers nothing more)."""
        self._refused = True
        self._disarm()
        self.transport.write(http_response(status, error_body(code, message), None, keep_alive=False))
        self.transport.pause_reading()
        self.transport.close()
        raise httptools.HttpParserError(f"refused with {status}")

    def send_400_response(self, msg: str) -> None:
        if not self._refused:
            super().send_400_response(msg)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._disarm()  # a connection's first bytes, or more of a slow request
        super().data_received(data)
        # A request that arrived in this read is done and costs no timer; one that is
        # still coming gets the time its part has left to arrive.
        if self._in_head:
            self._arm(REQUEST_TIMEOUT_S - (self.loop.time() - self._began))
        elif self._body_deadline is not None:
            self._arm(self._body_deadline - self.loop.time())

    # --- httptools callbacks -----------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0
        self._content_length = 0
        self._chunked = False
        self._in_head = True
        self._began = self.loop.time()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > MAX_URL_BYTES:
            self._refuse(414, "uri_too_long", f"the request line is over {MAX_URL_BYTES} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEADER_BYTES:
            self._refuse(431, "headers_too_large", f"the request's headers are over {MAX_HEADER_BYTES} bytes")
        lowered = name.lower()
        if lowered == b"content-length":
            text = value.decode("latin-1").strip()
            self._content_length = int(text) if digits(text) else 0
        elif lowered == b"transfer-encoding":
            self._chunked = True
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        length = self._content_length
        if length:
            self._body_deadline = self.loop.time() + REQUEST_TIMEOUT_S + length / BODY_FLOOR_BYTES_PER_S
        elif self._chunked:
            self._body_deadline = self.loop.time() + CHUNKED_BODY_TIMEOUT_S
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._body_deadline = None
        super().on_message_complete()
