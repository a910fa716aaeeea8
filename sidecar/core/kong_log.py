"""Kong's HTTP Log plugin payload (the serialized log of one request) as a usage event.

The shape is Kong's log serializer: request{method, uri, size, headers, id?},
response{status, size, headers}, consumer{id, custom_id, username}, route{id, name},
service{id, name}, latencies{request, kong, proxy}, client_ip, started_at (ms).
Sizes arrive as numbers or strings depending on the Kong version. Bodies are never
read, and only allow-listed headers are kept.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from sidecar.core.errors import InvalidInput
from sidecar.core.models import UsageEvent

ANONYMOUS = "anonymous"
# Where the request id lives, first match wins (Kong 3.5+ logs request.id).
_REQUEST_ID_HEADERS = ("x-kong-request-id", "x-request-id")


def _object(value: Any, path: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidInput(f"{path} must be an object", code="invalid_log", field=path)
    return value


def _int(value: Any, path: str) -> int:
    if value is None or value == "":
        return 0
    if isinstance(value, bool):
        raise InvalidInput(f"{path} must be a number", code="invalid_log", field=path)
    if isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        number = int(value.strip())
    else:
        raise InvalidInput(
            f"{path} must be a non-negative integer, got {value!r}", code="invalid_log", field=path
        )
    if number < 0:
        raise InvalidInput(f"{path} must not be negative", code="invalid_log", field=path)
    return number


def _str(value: Any, path: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidInput(f"{path} must be a string", code="invalid_log", field=path)
    return value


def _header(headers: Mapping[str, Any], name: str) -> str:
    value = headers.get(name)
    if isinstance(value, list):  # repeated headers arrive as lists
        value = value[0] if value else None
    return value if isinstance(value, str) else ""


def _fingerprint(log: Mapping[str, Any], request: Mapping[str, Any], consumer: str) -> str:
    """A stable id for a log entry without one: the same entry sent again (a retried
    batch) maps to the same id, two different requests practically never do."""
    parts = [
        str(log.get("started_at", "")),
        str(log.get("client_ip", "")),
        str(request.get("method", "")),
        str(request.get("uri") or request.get("url") or ""),
        consumer,
        str(_object(log.get("latencies"), "latencies").get("request", "")),
        str(_object(log.get("response"), "response").get("status", "")),
    ]
    return "fp-" + hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


def kong_log_event(
    log: Any, *, tenant: str, consumer_field: str, allowed_headers: frozenset[str]
) -> UsageEvent:
    """The usage event of one serialized Kong log; raises InvalidInput (field paths
    named) for a malformed entry."""
    log = _object(log, "$")
    request = _object(log.get("request"), "request")
    response = _object(log.get("response"), "response")
    consumer = _object(log.get("consumer"), "consumer")
    route = _object(log.get("route"), "route")
    service = _object(log.get("service"), "service")
    latencies = _object(log.get("latencies"), "latencies")
    request_headers = _object(request.get("headers"), "request.headers")
    response_headers = _object(response.get("headers"), "response.headers")
    consumer_id = _str(consumer.get(consumer_field), f"consumer.{consumer_field}") or ANONYMOUS
    request_id = _str(request.get("id"), "request.id")
    for name in _REQUEST_ID_HEADERS:
        request_id = request_id or _header(request_headers, name) or _header(response_headers, name)
    request_id = request_id or _fingerprint(log, request, consumer_id)
    headers = {
        name.lower(): _header(request_headers, name)[:2048]
        for name in request_headers
        if isinstance(name, str) and name.lower() in allowed_headers
    }
    proxy = _int(latencies.get("proxy"), "latencies.proxy")
    return UsageEvent(
        tenant=tenant,
        consumer_id=consumer_id,
        request_id=request_id,
        product=_str(service.get("name"), "service.name") or _str(service.get("id"), "service.id"),
        route=_str(route.get("name"), "route.name") or _str(route.get("id"), "route.id"),
        service=_str(service.get("name"), "service.name") or _str(service.get("id"), "service.id"),
        method=_str(request.get("method"), "request.method"),
        status=_int(response.get("status"), "response.status"),
        started_at_ms=_int(log.get("started_at"), "started_at"),
        latency_ms=_int(latencies.get("request"), "latencies.request"),
        upstream_latency_ms=proxy,
        gateway_latency_ms=_int(latencies.get("kong"), "latencies.kong"),
        request_size=_int(request.get("size"), "request.size"),
        response_size=_int(response.get("size"), "response.size"),
        headers={k: v for k, v in headers.items() if v},
    ).validated()
