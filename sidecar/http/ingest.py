"""Usage ingestion from gateways that do not run the plugin.

POST /integrations/kong/ingest     Kong's HTTP Log plugin payloads (one log or an array)
POST /integrations/apigee/ingest   aggregated Apigee analytics (the seed shape)

Both are authenticated by the tenant's shared secret (X-Aforo-Tenant names the tenant,
"default" when absent; X-Aforo-Ingest-Secret carries the secret), validated whole
before anything is stored, written to the same gateway event streams as the plugin's
ReportUsage (deduplicated on request id), and answered once Redis has them. Events in
flight are bounded: past the bound the answer is 503 with Retry-After, not a queue
that grows without limit.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Sequence

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from sidecar.core.apigee_stats import LATE_LIMIT_MS, Analytics, analytics_events
from sidecar.core.errors import InvalidInput
from sidecar.core.kong_log import KongPayload, kong_log_event
from sidecar.core.models import DEFAULT_TENANT, TENANT_RE, UsageEvent
from sidecar.http.bodies import decode, invalid_from, read_body
from sidecar.http.errors import ApiError

# Apigee analytics: a bucket is remembered for the late-data window plus an hour of slack.
APIGEE_DEDUPE_MS = LATE_LIMIT_MS + 3_600_000
TENANT_HEADER = "x-aforo-tenant"
SECRET_HEADER = "x-aforo-ingest-secret"
_kong_decoder = msgspec.json.Decoder(KongPayload)
_apigee_decoder = msgspec.json.Decoder(Analytics)
_encode = msgspec.json.Encoder().encode


class InFlight:
    """How many ingested events are being written right now, bounded."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.current = 0

    def take(self, count: int) -> None:
        if self.current + count > self.limit:
            raise ApiError(
                503,
                "ingest_busy",
                "the sidecar is writing as many events as it may hold; retry shortly",
                headers={"Retry-After": "1"},
            )
        self.current += count

    def give_back(self, count: int) -> None:
        self.current -= count


def _tenant(request: Request) -> str:
    """The authenticated tenant of an ingestion call; 401 before the body is read."""
    tenant = request.headers.get(TENANT_HEADER, DEFAULT_TENANT)
    secrets: dict[str, str] = request.app.state.settings.ingest_secrets
    expected = secrets.get(tenant) if TENANT_RE.fullmatch(tenant) else None
    given = request.headers.get(SECRET_HEADER, "")
    if expected is None or not hmac.compare_digest(given.encode(), expected.encode()):
        raise ApiError(
            401,
            "unauthorized",
            f"missing or wrong {SECRET_HEADER} for tenant {tenant!r}",
            field=SECRET_HEADER,
        )
    return tenant


async def _store(
    request: Request, events: Sequence[UsageEvent], dedupe_ttl_ms: int = 0, rate: bool = True
) -> list[bool]:
    """Record events, each once within ``dedupe_ttl_ms`` (0: event_dedupe_ttl_seconds),
    rated unless ``rate`` is False (Store.record_events)."""
    gate: InFlight = request.app.state.ingest_in_flight
    gate.take(len(events))
    try:
        settings = request.app.state.settings
        ttl_ms = max(dedupe_ttl_ms, settings.event_dedupe_ttl_seconds * 1000)
        return await request.app.state.store.record_events(events, ttl_ms, rate)
    finally:
        gate.give_back(len(events))


async def kong_ingest(request: Request) -> Response:
    tenant = _tenant(request)
    settings = request.app.state.settings
    payload = decode(await read_body(request, settings.ingest_max_body_bytes), _kong_decoder)
    logs = payload if isinstance(payload, list) else [payload]
    if len(logs) > settings.ingest_max_events:
        raise ApiError(413, "batch_too_large", f"a batch holds at most {settings.ingest_max_events} logs")
    allowed = frozenset(settings.ingest_header_allowlist)
    events = []
    for index, log in enumerate(logs):
        try:
            events.append(
                kong_log_event(
                    log, tenant=tenant, consumer_field=settings.kong_consumer_field, allowed_headers=allowed
                )
            )
        except InvalidInput as exc:
            if isinstance(payload, list):
                exc.field = f"[{index}].{exc.field}" if exc.field else f"[{index}]"
                exc.message = f"log {index}: {exc.message}"
            raise
    stored = await _store(request, events)
    body = {"accepted": sum(stored), "duplicates": len(stored) - sum(stored)}
    return Response(_encode(body), status_code=202, media_type="application/json")


async def apigee_ingest(request: Request) -> Response:
    tenant = _tenant(request)
    settings = request.app.state.settings
    body = await read_body(request, settings.ingest_max_body_bytes)
    try:
        payload = _apigee_decoder.decode(body)
    except msgspec.MsgspecError as exc:
        raise invalid_from(exc) from None
    if len(payload.metrics) > settings.ingest_max_events:
        raise ApiError(
            413, "batch_too_large", f"a payload holds at most {settings.ingest_max_events} metrics"
        )
    events, late = analytics_events(payload, tenant=tenant, now_ms=time.time_ns() // 1_000_000)
    # A bucket is accepted again until LATE_LIMIT_MS after its window ended (apigee-pull
    # re-reads that late-data window): it must be recognised for at least that long.
    stored = await _store(request, events, APIGEE_DEDUPE_MS, rate=settings.apigee_analytics == "rate")
    answer = {
        "status": "ok",
        "recordsProcessed": sum(stored),
        "recordsSkipped": late + len(stored) - sum(stored),
    }
    return Response(_encode(answer), media_type="application/json")
