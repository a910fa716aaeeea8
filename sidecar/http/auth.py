"""Bearer-token authentication of the admin API."""

from __future__ import annotations

import hmac

from starlette.requests import Request

from sidecar.http.errors import ApiError

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="aforo-admin"'}


def require_admin(request: Request) -> None:
    """Raise 401 unless the request carries the configured admin token."""
    expected: str | None = request.app.state.settings.admin_token
    if expected is None:
        raise ApiError(
            401,
            "admin_disabled",
            "the admin API is disabled: set AFORO_ADMIN_TOKEN (or --admin-token)",
            headers=_CHALLENGE,
        )
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "unauthorized", "missing bearer token", headers=_CHALLENGE)
    if not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise ApiError(401, "unauthorized", "invalid bearer token", headers=_CHALLENGE)
