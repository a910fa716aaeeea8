"""What every admin endpoint does with its request, whichever module serves it: check
the admin token before reading the body, name the tenant and the actor, answer JSON,
and log one line per change."""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from sidecar.core.models import DEFAULT_TENANT, TENANT_RE, check_id
from sidecar.http.auth import require_admin
from sidecar.http.bodies import read_body

log = logging.getLogger("aforo.admin")
_encode = msgspec.json.Encoder().encode


def json_response(value: Any, status: int = 200) -> Response:
    return Response(_encode(value), status_code=status, media_type="application/json")


def actor(request: Request) -> str:
    """Who made a change, for the audit trail."""
    return f"admin-api@{request.client.host if request.client else '-'}"


async def admin_body(request: Request) -> bytes:
    """The body of an admin write, read only once the token is checked."""
    require_admin(request)
    body = await read_body(request, request.app.state.settings.max_body_bytes)
    return body or b"{}"


def tenant_param(request: Request) -> str:
    """The ``?tenant=`` of a read (default: the default tenant)."""
    return check_id(request.query_params.get("tenant", DEFAULT_TENANT), TENANT_RE, "tenant")


def record(request: Request, action: str, tenant: str, target: str, **detail: Any) -> None:
    """One structured line per admin change (the Postgres audit log supersedes it)."""
    client = request.client.host if request.client else "-"
    log.info(
        "admin %s tenant=%s target=%s client=%s %s",
        action,
        tenant,
        target,
        client,
        " ".join(f"{k}={v!r}" for k, v in detail.items()),
    )
