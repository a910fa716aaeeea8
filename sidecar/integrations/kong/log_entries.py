"""Kong's HTTP Log plugin payload (the serialized log of one request) as a usage event.

The shape is Kong's log serializer: request{method, uri, size, headers, id?},
response{status, size, headers}, consumer{id, custom_id, username}, route{id, name},
service{id, name}, latencies{request, kong, proxy}, client_ip, started_at (ms).
Sizes arrive as numbers or strings depending on the Kong version. Only the fields
below are decoded (msgspec skips the rest without building them), bodies are never
read, and only allow-listed headers are kept.
"""

from __future__ import annotations

import hashlib

import msgspec

from sidecar.core.digits import digits
from sidecar.core.errors import InvalidInput
from sidecar.core.models import UsageEvent

ANONYMOUS = "anonymous"
# Where the request id lives, first match wins (Kong 3.5+ logs request.id).
_REQUEST_ID_HEADERS = ("x-kong-request-id", "x-request-id")
Number = int | float | str | None  # Kong writes some numbers as strings
Headers = dict[str, str | list[str]]


class _Request(msgspec.Struct):
    method: str = ""
    uri: str = ""
    url: str = ""
    size: Number = None
    headers: Headers = {}
    id: str | None = None


class _Response(msgspec.Struct):
    status: Number = None
    size: Number = None
    headers: Headers = {}


class _Named(msgspec.Struct):
    id: str | None = None
    name: str | None = None


class _Consumer(msgspec.Struct):
    id: str | None = None
    custom_id: str | None = None
    username: str | None = None


class _Latencies(msgspec.Struct):
    request: Number = None
    kong: Number = None
    proxy: Number = None


class KongLog(msgspec.Struct):
    request: _Request = msgspec.field(default_factory=_Request)
    response: _Response = msgspec.field(default_factory=_Response)
    consumer: _Consumer | None = None
    route: _Named | None = None
    service: _Named | None = None
    latencies: _Latencies = msgspec.field(default_factory=_Latencies)
    client_ip: str = ""
    started_at: Number = None


# A payload is one log or a batch of them.
KongPayload = list[KongLog] | KongLog


def _int(value: Number, path: str) -> int:
    if value is None or value == "":
        return 0
    if isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and digits(value.strip()):
        number = int(value.strip())
    else:
        raise InvalidInput(
            f"{path} must be a non-negative integer, got {value!r}", code="invalid_log", field=path
        )
    if number < 0:
        raise InvalidInput(f"{path} must not be negative", code="invalid_log", field=path)
    return number


# The aforo-authorize plugin's upstream header (kong_plugin: DECISION_HEADER), as logged.
DECISION_HEADER = "x-aforo-decision-id"


def _header(headers: Headers, name: str) -> str:
    value = headers.get(name)
    if isinstance(value, list):  # repeated headers arrive as lists
        return value[0] if value else ""
    return value or ""


def _fingerprint(log: KongLog, consumer: str) -> str:
    """A stable id for a log entry without one: the same entry sent again (a retried
    batch) maps to the same id, two different requests practically never do."""
    parts = [
        str(log.started_at),
        log.client_ip,
        log.request.method,
        log.request.uri or log.request.url,
        consumer,
        str(log.latencies.request),
        str(log.response.status),
    ]
    return "fp-" + hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


def kong_log_event(
    log: KongLog, *, tenant: str, consumer_field: str, allowed_headers: frozenset[str]
) -> UsageEvent:
    """The usage event of one decoded Kong log; raises InvalidInput (field named) for
    a value the decoder let through but the event cannot hold."""
    request, response = log.request, log.response
    consumer_id = (getattr(log.consumer, consumer_field) if log.consumer else None) or ANONYMOUS
    request_id = request.id or ""
    for name in _REQUEST_ID_HEADERS:
        request_id = request_id or _header(request.headers, name) or _header(response.headers, name)
    request_id = request_id or _fingerprint(log, consumer_id)
    headers = {}
    for name in request.headers:
        lowered = name.lower()
        if lowered in allowed_headers:
            value = _header(request.headers, name)[:2048]
            if value:
                headers[lowered] = value
    service = log.service or _Named()
    route = log.route or _Named()
    latencies = log.latencies
    return UsageEvent(
        tenant=tenant,
        consumer_id=consumer_id,
        request_id=request_id,
        product=service.name or service.id or "",
        route=route.name or route.id or "",
        service=service.name or service.id or "",
        method=request.method,
        status=_int(response.status, "response.status"),
        started_at_ms=_int(log.started_at, "started_at"),
        latency_ms=_int(latencies.request, "latencies.request"),
        upstream_latency_ms=_int(latencies.proxy, "latencies.proxy"),
        gateway_latency_ms=_int(latencies.kong, "latencies.kong"),
        request_size=_int(request.size, "request.size"),
        response_size=_int(response.size, "response.size"),
        # Set upstream by the aforo-authorize plugin and logged with the request: the
        # call was decided (and charged) by the sidecar, so ingestion does not rate it.
        decision_id=_header(request.headers, DECISION_HEADER)[:512],
        headers=headers,
    ).validated()
