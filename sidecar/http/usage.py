"""POST /v1/usage: gateway usage events over HTTP (the gRPC ReportUsage twin), for the
Apigee PostClientFlow and for the Kong plugin's HTTP fallback."""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from sidecar.core.errors import InvalidInput
from sidecar.core.models import UsageEvent
from sidecar.http.bodies import decode, invalid_from, read_body
from sidecar.http.decisions import check_gateway
from sidecar.http.errors import ErrorBody

# How many per-event errors an answer lists (the count is always complete).
ANSWER_ERRORS = 10
_events_decoder = msgspec.json.Decoder(list[dict[str, Any]] | dict[str, Any])
_encode = msgspec.json.Encoder().encode


class UsageAnswer(msgspec.Struct):
    accepted: int
    duplicates: int
    rejected: int
    errors: list[ErrorBody]


async def report_usage(request: Request) -> Response:
    """One event (an object) or a batch (an array). Valid events are stored, each once
    per request id; invalid ones are counted and listed, not stored. 200 once stored."""
    settings = request.app.state.settings
    tokens = request.app.state.authorizer.gateway_tokens
    auth = request.headers.get("authorization")
    await check_gateway(tokens, auth, None)  # before reading a byte of the body
    payload = decode(await read_body(request, settings.max_body_bytes), _events_decoder)
    items = payload if isinstance(payload, list) else [payload]
    if len(items) > settings.max_batch_items:
        raise InvalidInput(
            f"a batch holds at most {settings.max_batch_items} events", code="batch_too_large", field="events"
        )
    events: list[UsageEvent] = []
    errors: list[ErrorBody] = []
    rejected = 0
    for index, item in enumerate(items):
        try:
            try:
                events.append(msgspec.convert(item, UsageEvent).validated())
            except msgspec.ValidationError as exc:
                raise invalid_from(exc) from None
        except InvalidInput as exc:
            rejected += 1
            if len(errors) < ANSWER_ERRORS:
                field = f"[{index}].{exc.field}" if exc.field else f"[{index}]"
                errors.append(ErrorBody(code=exc.code, message=exc.message, field=field))
    for tenant in sorted({e.tenant for e in events}):
        await check_gateway(tokens, auth, tenant)
    stored = await request.app.state.store.record_events(events, settings.event_dedupe_ttl_seconds * 1000)
    answer = UsageAnswer(
        accepted=sum(stored), duplicates=len(stored) - sum(stored), rejected=rejected, errors=errors
    )
    return Response(_encode(answer), media_type="application/json")
