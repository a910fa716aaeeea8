"""Usage ingestion from gateways that do not run the plugin: what the gateways' ingest
routes share (``POST /integrations/kong/ingest`` for Kong's HTTP Log payloads in
``sidecar.integrations.kong.routes``, ``POST /integrations/apigee/ingest`` for aggregated
Apigee analytics in ``sidecar.integrations.apigee.routes``).

Both are authenticated by the tenant's shared secret (X-Aforo-Tenant names the tenant,
"default" when absent; X-Aforo-Ingest-Secret carries the secret), validated whole
before anything is stored, written to the same gateway event streams as the plugin's
ReportUsage (deduplicated on request id), and answered once Redis has them. Events in
flight are bounded: past the bound the answer is 503 with Retry-After, not a queue
that grows without limit.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from starlette.requests import Request

from sidecar.core.models import DEFAULT_TENANT, TENANT_RE, UsageEvent
from sidecar.http.errors import ApiError

TENANT_HEADER = "x-aforo-tenant"
SECRET_HEADER = "x-aforo-ingest-secret"


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


def ingest_tenant(request: Request) -> str:
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


async def store_events(
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
