"""Error bodies and the exception handlers that produce them.

Every error answers ``{"error": {"code", "message", "field"}}``; ``code`` is stable and
machine-readable.
"""

from __future__ import annotations

import logging

import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from sidecar import metrics
from sidecar.catalog import TruthUnavailable
from sidecar.core.errors import Conflict, InvalidInput, NotFound
from sidecar.store.base import StoreUnavailable

log = logging.getLogger("aforo.http")


class ErrorBody(msgspec.Struct, omit_defaults=True):
    code: str
    message: str
    field: str | None = None


class Envelope(msgspec.Struct):
    error: ErrorBody


class ApiError(Exception):
    """An error with its HTTP status, raised by the HTTP layer itself."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers


_encode = msgspec.json.Encoder().encode


def error_body(code: str, message: str, field: str | None = None) -> bytes:
    return _encode(Envelope(ErrorBody(code=code, message=message, field=field)))


def error_response(
    status: int,
    code: str,
    message: str,
    field: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body = error_body(code, message, field)
    return Response(body, status_code=status, media_type="application/json", headers=headers)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)


async def _invalid(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, InvalidInput)
    return error_response(400, exc.code, exc.message, exc.field)


async def _not_found(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, NotFound)
    return error_response(404, exc.code, exc.message)


async def _conflict(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Conflict)
    return error_response(409, exc.code, exc.message)


async def _unavailable(request: Request, exc: Exception) -> Response:
    # Every HTTP call but a decision (admin, usage, ingestion): decisions count as "decide".
    metrics.STORE_ERRORS.labels("http").inc()
    log.warning("store unavailable on %s %s: %s", request.method, request.url.path, exc)
    return error_response(
        503,
        "store_unavailable",
        "the store is unreachable; nothing was changed",
        headers={"Retry-After": "1"},
    )


async def _truth_unavailable(request: Request, exc: Exception) -> Response:
    log.warning("postgres unavailable on %s %s: %s", request.method, request.url.path, exc)
    return error_response(
        503,
        "database_unavailable",
        "Postgres, the source of truth, is unreachable; nothing was changed: retry later",
        headers={"Retry-After": "1"},
    )


async def _http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    codes = {404: "not_found", 405: "method_not_allowed"}
    return error_response(
        exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail), headers=exc.headers
    )


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "internal error; see the sidecar's log")


EXCEPTION_HANDLERS = {
    ApiError: _api_error,
    InvalidInput: _invalid,
    NotFound: _not_found,
    Conflict: _conflict,
    StoreUnavailable: _unavailable,
    TruthUnavailable: _truth_unavailable,
    HTTPException: _http,
    Exception: _unexpected,
}
