"""Hostile input at both HTTP ports (issue 18): an oversized declared body answered 413
at once, an over-long request line 414, oversized headers 431, a request trickling in
slower than the limit cut off, the process not grown by a huge request line; and error
bodies that echo at most a short prefix of an offending value. Raw sockets against a
real sidecar process, so nothing between the client and the server helps. The decision
port has its own server (sidecar/http/decision_server.py), the HTTP port uvicorn's with
the same limits (sidecar/http/guarded_http.py)."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import httpx
import pytest

from sidecar.http.decision_server import MAX_HEADER_BYTES, MAX_URL_BYTES, REQUEST_TIMEOUT_S
from tests.conftest import ADMIN

pytestmark = pytest.mark.slow


@pytest.fixture
def sidecar(redis_url, prefix, start_sidecar):
    return start_sidecar(
        {"AFORO_REDIS_URL": redis_url, "AFORO_KEY_PREFIX": prefix, "AFORO_MAX_BODY_BYTES": "4096"}
    )


@pytest.fixture(params=["http port", "decision port"])
def port(request, sidecar) -> int:
    return sidecar.port if request.param == "http port" else sidecar.decision_port


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes (a refused request closes its connection)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def _status_and_error(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)["error"]


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_declared_body_over_the_limit_is_413_at_once(sidecar, port):
    with _connect(port) as sock:
        started = time.monotonic()
        sock.sendall(
            b"POST /v1/authorize HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: 10000000\r\n\r\n"
        )
        raw = _read_all(sock)  # the body is never sent: the answer must not wait for it
        elapsed = time.monotonic() - started
    status, error = _status_and_error(raw)
    assert (status, error["code"]) == (413, "body_too_large")
    assert b"connection: close" in raw
    # Not a timing assertion on speed: the server had 12 s of body to wait for and
    # did not; anything under the request timeout shows it answered from the headers.
    assert elapsed < REQUEST_TIMEOUT_S


def test_a_huge_request_line_is_414_and_does_not_grow_the_process(sidecar, port):
    before = _rss_kb(sidecar.proc.pid)
    with _connect(port) as sock:
        sock.sendall(b"POST /v1/authorize?" + b"a" * (MAX_URL_BYTES + 10))
        try:
            for _ in range(16 * 1024):  # 16 MB more of it, which the server must not keep
                sock.sendall(b"a" * 1024)
        except OSError:
            pass  # the server closed the connection (a reset, a broken pipe): what a refusal does
        raw = _read_all(sock)
    if raw:  # the answer may be lost to the reset a closed socket sends to a writer
        status, error = _status_and_error(raw)
        assert (status, error["code"]) == (414, "uri_too_long")
    assert _rss_kb(sidecar.proc.pid) - before < 8 * 1024  # not grown by the 16 MB


def test_a_long_request_line_is_answered_414(sidecar, port):
    with _connect(port) as sock:
        sock.sendall(b"GET /healthz?" + b"a" * (MAX_URL_BYTES + 10) + b" HTTP/1.1\r\nhost: x\r\n\r\n")
        status, error = _status_and_error(_read_all(sock))
    assert (status, error["code"]) == (414, "uri_too_long")


def test_oversized_headers_are_431(sidecar, port):
    headers = b"".join(b"x-filler-%d: %s\r\n" % (i, b"v" * 1000) for i in range(MAX_HEADER_BYTES // 1000 + 2))
    with _connect(port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n" + headers + b"\r\n")
        status, error = _status_and_error(_read_all(sock))
    assert (status, error["code"]) == (431, "headers_too_large")


def test_a_request_trickling_in_is_cut_off_and_others_are_served(sidecar, port):
    """One header byte a second (slowloris): the connection is closed within the
    documented limit, while a normal client is served meanwhile."""
    request = b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-slow: " + b"z" * 60 + b"\r\n\r\n"
    with _connect(port) as slow:
        started = time.monotonic()
        closed_after = None
        for byte in request:
            try:
                slow.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed_after = time.monotonic() - started
                break
            slow.settimeout(1.0)
            try:
                if slow.recv(1) == b"":
                    closed_after = time.monotonic() - started
                    break
            except TimeoutError:
                pass
            if time.monotonic() - started > REQUEST_TIMEOUT_S + 3:
                break
            with httpx.Client(base_url=f"http://127.0.0.1:{port}") as other:
                assert other.get("/healthz").status_code == 200
    assert closed_after is not None, "the trickling connection was never closed"
    assert REQUEST_TIMEOUT_S - 1 <= closed_after <= REQUEST_TIMEOUT_S + 2


def test_a_request_in_pieces_within_the_limit_is_served(sidecar, port):
    body = json.dumps({"consumer_id": "nobody", "product": "api"}).encode()
    request = (
        b"POST /v1/authorize HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )
    with _connect(port) as sock:
        for start in range(0, len(request), 20):
            sock.sendall(request[start : start + 20])
            time.sleep(0.05)
        raw = b""
        while b"\r\n\r\n" not in raw or len(raw.partition(b"\r\n\r\n")[2]) < 10:
            raw += sock.recv(65536)
    assert raw.startswith(b"HTTP/1.1 403") and b'"reason":"unknown_consumer"' in raw  # a decision


def test_error_bodies_echo_only_a_prefix_of_a_huge_value(sidecar):
    huge = "x" * 60_000
    with httpx.Client(base_url=sidecar.url) as main:
        response = main.get(f"/v1/admin/consumers/{huge}", headers=ADMIN)
        assert response.status_code == 414 and len(response.text) < 1_000  # over the line's cap
        response = main.get(f"/v1/admin/consumers/{huge[:6_000]}", headers=ADMIN)
        assert response.status_code == 400
        assert len(response.text) < 1_000
        response = main.post("/v1/authorize", json={"consumer_id": huge[:3_000], "product": "api"})
        assert response.status_code == 400 and len(response.text) < 1_000
    with httpx.Client(base_url=sidecar.decision_url) as fast:
        response = fast.post("/v1/authorize", json={"consumer_id": "c1", "product": "p" * 3_000})
        assert response.status_code == 400 and len(response.text) < 1_000


def test_a_connection_that_sends_nothing_is_closed_on_the_http_port(sidecar):
    """uvicorn closes a connection idle after a response; one that never sends a
    request is held to the same limit as a request's head."""
    with _connect(sidecar.port) as idle:
        started = time.monotonic()
        idle.settimeout(REQUEST_TIMEOUT_S + 3)
        assert idle.recv(1) == b""
        assert REQUEST_TIMEOUT_S - 1 <= time.monotonic() - started <= REQUEST_TIMEOUT_S + 2


def test_a_body_trickling_in_is_cut_off_on_the_http_port(sidecar):
    """The body of a request, once its head is in, at 64 KiB/s at least."""
    request = (
        b"POST /v1/admin/plans/slow HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"authorization: Bearer " + ADMIN["Authorization"].split()[1].encode() + b"\r\n"
        b"content-length: 100\r\n\r\n{"
    )
    with _connect(sidecar.port) as slow:
        slow.sendall(request)
        started = time.monotonic()
        slow.settimeout(1.0)
        closed_after = None
        while time.monotonic() - started < REQUEST_TIMEOUT_S + 3:
            try:
                slow.sendall(b" ")
                if slow.recv(65536) == b"":
                    closed_after = time.monotonic() - started
                    break
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed_after = time.monotonic() - started
                break
    assert closed_after is not None, "the trickling body was never cut off"
    assert closed_after <= REQUEST_TIMEOUT_S + 2
    with httpx.Client(base_url=sidecar.url) as main:  # and nothing was written
        assert main.get("/v1/admin/plans/slow", headers=ADMIN).status_code == 404
