"""What every admin endpoint does with its request, whichever module serves it: read the
body (the caller's token was checked before, by http/access.py), name the tenant (one
the caller may see) and the actor, answer JSON, and log one line per change."""

from __future__ import annotations

import base64
import logging
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from sidecar.core.digits import digits
from sidecar.core.errors import InvalidInput
from sidecar.core.models import DEFAULT_TENANT, TENANT_RE, check_id
from sidecar.http.access import principal, scope
from sidecar.http.bodies import read_body

log = logging.getLogger("aforo.admin")
_encode = msgspec.json.Encoder().encode


def json_response(value: Any, status: int = 200) -> Response:
    return Response(_encode(value), status_code=status, media_type="application/json")


def actor(request: Request) -> str:
    """Who made a change, for the audit trail: the token (id and name) and the address."""
    client = request.client.host if request.client else "-"
    return f"{principal(request).actor}@{client}"


async def admin_body(request: Request) -> bytes:
    """The body of an admin write."""
    body = await read_body(request, request.app.state.settings.max_body_bytes)
    return body or b"{}"


def tenant_param(request: Request) -> str:
    """The ``?tenant=`` of a call (default: the default tenant), one the caller may see
    (404 ``tenant_not_found`` otherwise)."""
    return scope(request, check_id(request.query_params.get("tenant", DEFAULT_TENANT), TENANT_RE, "tenant"))


def record(request: Request, action: str, tenant: str, target: str, **detail: Any) -> None:
    """One structured line per admin change (the Postgres audit log supersedes it)."""
    log.info(
        "admin %s tenant=%s target=%s actor=%s %s",
        action,
        tenant,
        target,
        actor(request),
        " ".join(f"{k}={v!r}" for k, v in detail.items()),
    )


MAX_PAGE = 1000


class Page(msgspec.Struct):
    items: list[Any]
    next_cursor: str | None


def page_request(request: Request) -> tuple[str | None, int]:
    """The ``cursor`` (the id to continue after) and ``limit`` of a list call."""
    params = request.query_params
    text = params.get("limit", "100")
    if not digits(text) or not 1 <= int(text) <= MAX_PAGE:
        raise InvalidInput(f"limit must be 1 to {MAX_PAGE}", field="limit")
    cursor = params.get("cursor")
    after = None
    if cursor:
        try:
            after = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        except (ValueError, UnicodeDecodeError):
            raise InvalidInput("cursor is not one this API gave", field="cursor") from None
        if not after or not after.isprintable():
            raise InvalidInput("cursor is not one this API gave", field="cursor")
    return after, int(text)


def page_cursor(after: str | None) -> str | None:
    return None if after is None else base64.urlsafe_b64encode(after.encode()).decode().rstrip("=")
