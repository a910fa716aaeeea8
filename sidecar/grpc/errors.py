"""How the gRPC servicers end a call that cannot be answered."""

from __future__ import annotations

from typing import NoReturn

import grpc

from sidecar.core.errors import InvalidInput

# Trailing metadata keys carrying the machine-readable error (same codes as HTTP).
ERROR_CODE_KEY = "aforo-error-code"
ERROR_FIELD_KEY = "aforo-error-field"


async def abort_invalid(context: grpc.aio.ServicerContext, exc: InvalidInput) -> NoReturn:
    """INVALID_ARGUMENT with a readable detail and the error code in trailing metadata."""
    detail = f"{exc.field}: {exc.message}" if exc.field else exc.message
    trailers = [(ERROR_CODE_KEY, exc.code)]
    if exc.field:
        trailers.append((ERROR_FIELD_KEY, exc.field))
    context.set_trailing_metadata(tuple(trailers))
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, detail)
