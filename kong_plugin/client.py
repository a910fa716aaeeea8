"""The plugin server's connection to the sidecar: gRPC first, HTTP as the fallback.

One ``SidecarClient`` per sidecar address per plugin-server process (``client_for``),
shared by every plugin instance and every request thread: one lazily created gRPC
channel (HTTP/2, multiplexed, thread-safe) and a small pool of keep-alive HTTP
connections. Nothing is opened per request.

A transport that fails to connect is skipped for ``COOLDOWN_S`` (the sidecar is down
or restarting), so a dead sidecar costs a request nothing but the fail-mode answer.
A timeout does not trip it: a slow sidecar may answer the next request in time.
"""

from __future__ import annotations

import http.client
import os
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import msgspec

from sidecar.grpc.gen.aforo.sidecar.v1 import sidecar_pb2 as pb
from sidecar.grpc.gen.aforo.sidecar.v1 import sidecar_pb2_grpc as pb_grpc

# The trailers in which the sidecar names why it refused a request (its
# sidecar/grpc/errors.py; tests/test_boundaries.py keeps the two the same).
ERROR_CODE_KEY = "aforo-error-code"
ERROR_FIELD_KEY = "aforo-error-field"

COOLDOWN_S = 1.0
HTTP_POOL_SIZE = 32
# Reconnect quickly after a sidecar restart (gRPC's default backoff grows to 120 s,
# during which every call would fail over to HTTP).
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.enable_retries", 0),
]
_json_encode = msgspec.json.encode
_json_decode = msgspec.json.decode


class SidecarUnavailable(Exception):
    """No transport answered within the budget; the fail mode decides."""


class RequestRejected(Exception):
    """The sidecar refused the request as invalid (e.g. an API key of the wrong length)."""

    def __init__(self, code: str, message: str, field: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


@dataclass(frozen=True, slots=True)
class Window:
    window: str
    limit: int
    remaining: int
    reset: int  # epoch seconds


@dataclass(frozen=True, slots=True)
class Verdict:
    """The parts of the sidecar's decision the plugin acts on."""

    allow: bool
    reason: str
    status: int
    decision_id: str
    consumer_id: str | None
    retry_after: int | None
    windows: tuple[Window, ...]
    balance: int | None
    degraded: bool


@dataclass(frozen=True, slots=True)
class Ask:
    """One authorize request (exactly one of consumer_id and api_key)."""

    tenant: str
    product: str
    consumer_id: str | None = None
    api_key: str | None = None
    cost: int | None = None
    hits: int = 1


@dataclass(slots=True)
class UsageAck:
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    first_error: str = ""


def _verdict_from_pb(message: pb.Decision) -> Verdict:
    return Verdict(
        allow=message.allow,
        reason=message.reason,
        status=message.status,
        decision_id=message.decision_id,
        consumer_id=message.consumer_id if message.HasField("consumer_id") else None,
        retry_after=message.retry_after if message.HasField("retry_after") else None,
        windows=tuple(Window(w.window, w.limit, w.remaining, w.reset) for w in message.windows),
        balance=message.balance if message.HasField("balance") else None,
        degraded=message.degraded,
    )


def _verdict_from_json(body: dict[str, Any]) -> Verdict:
    return Verdict(
        allow=bool(body["allow"]),
        reason=str(body["reason"]),
        status=int(body["status"]),
        decision_id=str(body.get("decision_id") or ""),
        consumer_id=body.get("consumer_id"),
        retry_after=body.get("retry_after"),
        windows=tuple(
            Window(str(w["window"]), int(w["limit"]), int(w["remaining"]), int(w["reset"]))
            for w in body.get("windows") or ()
        ),
        balance=body.get("balance"),
        degraded=bool(body.get("degraded", False)),
    )


def _usage_pb(event: dict[str, Any]) -> pb.UsageEvent:
    return pb.UsageEvent(**event)


@dataclass(frozen=True, slots=True)
class Tls:
    """How the plugin server speaks TLS to the sidecar: over gRPC when ``grpc`` is set,
    over HTTP for every ``https://`` URL. ``ca_file`` is the CA that signed the
    sidecar's certificate (None: the system's CAs); ``cert_file`` and ``key_file`` the
    plugin's client certificate, for a sidecar that requires mutual TLS."""

    grpc: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def ssl_context(self) -> ssl.SSLContext:
        """For HTTPS: the sidecar's certificate verified, host name included."""
        context = ssl.create_default_context(cafile=self.ca_file)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert_file is not None:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def grpc_credentials(self) -> grpc.ChannelCredentials:
        def read(path: str | None) -> bytes | None:
            return None if path is None else Path(path).read_bytes()

        return grpc.ssl_channel_credentials(read(self.ca_file), read(self.key_file), read(self.cert_file))


PLAIN = Tls()


@dataclass(frozen=True, slots=True)
class Address:
    """Where and how to reach one sidecar: what a plugin configuration says of it, and
    the key under which the process keeps one client (and one usage batcher) for it."""

    grpc_target: str
    http_url: str
    protocol: str = "grpc"
    http_fallback: bool = True
    decision_url: str | None = None  # the decision port; None: http_url
    gateway_token: str | None = field(default=None, repr=False)  # a secret: never in a log line
    tls: Tls = PLAIN


class _HttpPool:
    """Keep-alive HTTP/1.1 connections to one sidecar, shared by all threads."""

    def __init__(self, base_url: str, headers: dict[str, str] | None = None, tls: Tls = PLAIN) -> None:
        parts = urlsplit(base_url)
        self.headers = {"Content-Type": "application/json", "Connection": "keep-alive", **(headers or {})}
        self.https = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.https else 80)
        self.base_path = parts.path.rstrip("/")
        # One context for the pool: loading the CA and the key pair is done once.
        self._context = tls.ssl_context() if self.https else None
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def _new(self, timeout: float) -> http.client.HTTPConnection:
        if self._context is not None:
            return http.client.HTTPSConnection(self.host, self.port, timeout=timeout, context=self._context)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def post(self, path: str, body: bytes, timeout: float) -> tuple[int, bytes]:
        """POST and read the answer within ``timeout`` seconds. A pooled connection the
        server closed while idle is retried once on a new one (the request was not
        received, so nothing can be counted twice)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            reused = conn is not None
            if conn is None:
                conn = self._new(timeout)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                conn.close()
                raise TimeoutError("http budget spent")
            try:
                conn.timeout = remaining
                if conn.sock is not None:
                    conn.sock.settimeout(remaining)
                conn.request(
                    "POST",
                    self.base_path + path,
                    body=body,
                    headers=self.headers,
                )
                response = conn.getresponse()
                data = response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                conn.close()
                if reused:
                    continue
                raise
            except BaseException:
                conn.close()
                raise
            if response.will_close:
                conn.close()
            else:
                with self._lock:
                    if len(self._idle) < HTTP_POOL_SIZE:
                        self._idle.append(conn)
                        conn = None
                if conn is not None:
                    conn.close()
            return response.status, data

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class SidecarClient:
    def __init__(self, address: Address) -> None:
        self.grpc_target = address.grpc_target
        self.tls = address.tls
        self.use_grpc = address.protocol == "grpc"
        self.use_http = address.protocol == "http" or address.http_fallback
        # The sidecar's gateway token (when it requires one), on every call: a header
        # over HTTP, metadata over gRPC.
        token = address.gateway_token
        auth = {} if token is None else {"Authorization": f"Bearer {token}"}
        self._metadata = tuple((k.lower(), v) for k, v in auth.items()) or None
        self._http = _HttpPool(address.http_url, auth, address.tls)
        # The sidecar's decision port serves decisions only (usage stays on http_url).
        decision_url = address.decision_url
        self._decisions = _HttpPool(decision_url, auth, address.tls) if decision_url else self._http
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._stub: pb_grpc.SidecarStub | None = None
        self._grpc_down_until = 0.0
        self._http_down_until = 0.0
        # How often each transport answered; read by tests and logged at shutdown.
        self.grpc_calls = 0
        self.http_calls = 0

    def _sidecar_stub(self) -> pb_grpc.SidecarStub:
        stub = self._stub
        if stub is None:
            with self._lock:
                if self._stub is None:
                    self._channel = (
                        grpc.secure_channel(self.grpc_target, self.tls.grpc_credentials(), _CHANNEL_OPTIONS)
                        if self.tls.grpc
                        else grpc.insecure_channel(self.grpc_target, options=_CHANNEL_OPTIONS)
                    )
                    self._stub = pb_grpc.SidecarStub(self._channel)
                stub = self._stub
        return stub

    # --- decisions -------------------------------------------------------------------

    def authorize(self, ask: Ask, timeout_s: float) -> Verdict:
        """The sidecar's decision within ``timeout_s`` seconds, over gRPC or HTTP.

        Raises RequestRejected when the sidecar refuses the request as invalid, and
        SidecarUnavailable when no transport answers in time.
        """
        deadline = time.monotonic() + timeout_s
        if self.use_grpc and time.monotonic() >= self._grpc_down_until:
            message = pb.AuthorizeRequest(
                product=ask.product,
                tenant=ask.tenant,
                consumer_id=ask.consumer_id,
                api_key=ask.api_key,
                cost=ask.cost,
                hits=ask.hits,
            )
            try:
                answer = self._sidecar_stub().Authorize(message, timeout=timeout_s, metadata=self._metadata)
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
                if code == grpc.StatusCode.INVALID_ARGUMENT and isinstance(exc, grpc.Call):
                    trailers = dict(exc.trailing_metadata() or ())
                    raise RequestRejected(
                        str(trailers.get(ERROR_CODE_KEY, "invalid_request")),
                        exc.details() or "invalid request",
                        str(trailers.get(ERROR_FIELD_KEY, "")),
                    ) from None
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    # The budget is spent: no time is left for a fallback, and a retry
                    # of a call the sidecar may still apply could count it twice.
                    raise SidecarUnavailable("grpc: deadline exceeded") from None
                self._grpc_down_until = time.monotonic() + COOLDOWN_S
                if not self.use_http:
                    raise SidecarUnavailable(f"grpc: {code.name}") from None
            else:
                self.grpc_calls += 1
                return _verdict_from_pb(answer)
        if not self.use_http or time.monotonic() < self._http_down_until:
            raise SidecarUnavailable("no transport available")
        remaining = deadline - time.monotonic()
        if remaining <= 0.001:
            raise SidecarUnavailable("budget spent before the http fallback")
        body: dict[str, Any] = {"tenant": ask.tenant, "product": ask.product, "hits": ask.hits}
        if ask.consumer_id is not None:
            body["consumer_id"] = ask.consumer_id
        if ask.api_key is not None:
            body["api_key"] = ask.api_key
        if ask.cost is not None:
            body["cost"] = ask.cost
        status, data = self._http_post("/v1/authorize", _json_encode(body), remaining, self._decisions)
        try:
            answer = _json_decode(data)
        except msgspec.DecodeError:
            raise SidecarUnavailable(f"http: {status} with a body that is not JSON") from None
        if isinstance(answer, dict) and "allow" in answer:
            self.http_calls += 1
            return _verdict_from_json(answer)
        if status == 401:
            # The sidecar wants a (valid) gateway token: the plugin's configuration is
            # wrong, not the request; the fail mode answers.
            raise SidecarUnavailable("http: the sidecar refused the plugin's gateway_token (401)")
        if isinstance(answer, dict) and isinstance(answer.get("error"), dict) and 400 <= status < 500:
            error = answer["error"]
            raise RequestRejected(
                str(error.get("code", "invalid_request")),
                str(error.get("message", "invalid request")),
                str(error.get("field") or ""),
            )
        raise SidecarUnavailable(f"http: unexpected answer {status}")

    def _http_post(
        self, path: str, body: bytes, timeout_s: float, pool: _HttpPool | None = None
    ) -> tuple[int, bytes]:
        try:
            return (pool or self._http).post(path, body, timeout_s)
        except TimeoutError:
            raise SidecarUnavailable("http: timeout") from None
        except (OSError, http.client.HTTPException) as exc:
            self._http_down_until = time.monotonic() + COOLDOWN_S
            raise SidecarUnavailable(f"http: {exc!r}") from None

    # --- usage -----------------------------------------------------------------------

    def report_usage(self, events: Sequence[dict[str, Any]], timeout_s: float) -> UsageAck:
        """Send one batch of usage events (ReportUsage, or POST /v1/usage). Raises
        SidecarUnavailable when it may not have been stored; resending is safe (the
        sidecar deduplicates on the request id)."""
        if self.use_grpc and time.monotonic() >= self._grpc_down_until:
            try:
                ack = self._sidecar_stub().ReportUsage(
                    (_usage_pb(event) for event in events), timeout=timeout_s, metadata=self._metadata
                )
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
                if code == grpc.StatusCode.UNAVAILABLE:
                    self._grpc_down_until = time.monotonic() + COOLDOWN_S
                if not self.use_http or code != grpc.StatusCode.UNAVAILABLE:
                    raise SidecarUnavailable(f"grpc: {code.name}") from None
            else:
                first = ack.errors[0] if ack.errors else None
                return UsageAck(
                    ack.accepted,
                    ack.duplicates,
                    ack.rejected,
                    f"{first.code} {first.field}: {first.message}" if first else "",
                )
        if not self.use_http:
            raise SidecarUnavailable("grpc unavailable and no http fallback")
        total = UsageAck()
        for chunk in _chunks(events):
            status, data = self._http_post("/v1/usage", chunk, timeout_s)
            if status != 200:
                raise SidecarUnavailable(f"http /v1/usage answered {status}: {data[:200]!r}")
            answer = _json_decode(data)
            total.accepted += int(answer.get("accepted", 0))
            total.duplicates += int(answer.get("duplicates", 0))
            total.rejected += int(answer.get("rejected", 0))
            errors = answer.get("errors") or []
            if errors and not total.first_error:
                first = errors[0]
                total.first_error = f"{first.get('code')} {first.get('field')}: {first.get('message')}"
        return total

    def close(self) -> None:
        with self._lock:
            channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            channel.close()
        self._http.close()
        self._decisions.close()


# The sidecar refuses HTTP bodies over its max_body_bytes (64 KiB by default) and batches
# over max_batch_items (1000): split well below both.
HTTP_CHUNK_BYTES = 48 * 1024
HTTP_CHUNK_ITEMS = 500


def _chunks(events: Sequence[dict[str, Any]]) -> list[bytes]:
    chunks: list[bytes] = []
    current: list[bytes] = []
    size = 2
    for event in events:
        encoded = _json_encode(event)
        if current and (size + len(encoded) + 1 > HTTP_CHUNK_BYTES or len(current) >= HTTP_CHUNK_ITEMS):
            chunks.append(b"[" + b",".join(current) + b"]")
            current, size = [], 2
        current.append(encoded)
        size += len(encoded) + 1
    if current:
        chunks.append(b"[" + b",".join(current) + b"]")
    return chunks


_clients: dict[Address, SidecarClient] = {}
_clients_lock = threading.Lock()
_clients_pid = os.getpid()


def client_for(address: Address) -> SidecarClient:
    """The process's client for this sidecar address (and token and TLS), created on first use."""
    global _clients_pid
    client = _clients.get(address)
    if client is not None and _clients_pid == os.getpid():
        return client
    with _clients_lock:
        if _clients_pid != os.getpid():
            # A forked child must not use its parent's gRPC channel (gRPC is not fork-safe).
            _clients.clear()
            _clients_pid = os.getpid()
        client = _clients.get(address)
        if client is None:
            client = SidecarClient(address)
            _clients[address] = client
        return client


def close_all() -> None:
    with _clients_lock:
        clients = list(_clients.values())
        _clients.clear()
    for client in clients:
        client.close()
