"""Liveness, readiness and metrics."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sidecar import metrics
from sidecar.store.base import StoreUnavailable


async def healthz(request: Request) -> Response:
    """The process is up and serving (says nothing about Redis)."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Ready when the store answers: a load balancer should stop routing here otherwise
    (decisions would only come from the fail mode)."""
    try:
        await request.app.state.store.ping()
    except StoreUnavailable as exc:
        return JSONResponse({"status": "unavailable", "store": str(exc)}, status_code=503)
    return JSONResponse({"status": "ready"})


async def metrics_endpoint(request: Request) -> Response:
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)
