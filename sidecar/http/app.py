"""The Starlette application."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.routing import Route

from sidecar.authorizer import Authorizer
from sidecar.config import Settings, load_settings
from sidecar.http import admin, decisions, probes
from sidecar.http.errors import EXCEPTION_HANDLERS
from sidecar.store.base import Store, StoreUnavailable
from sidecar.store.factory import build_store
from sidecar.store.redis_store import RedisStore

log = logging.getLogger("aforo.http")


def create_app(settings: Settings, store: Store | None = None) -> Starlette:
    """The app over ``store`` (built from the settings when not given; closed on exit)."""
    owned = store is None
    active: Store = build_store(settings) if store is None else store

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if isinstance(active, RedisStore):
            try:
                await active.load_scripts()
            except StoreUnavailable as exc:
                # Start anyway: decisions follow the fail mode until Redis answers.
                log.warning("redis unreachable at start (%s); serving in fail mode", exc)
        yield
        if owned:
            await active.close()

    routes = [
        Route("/v1/authorize", decisions.authorize, methods=["POST"]),
        Route("/integrations/apigee/authorize", decisions.apigee_authorize, methods=["POST"]),
        *admin.ROUTES,
        Route("/healthz", probes.healthz, methods=["GET"]),
        Route("/readyz", probes.readyz, methods=["GET"]),
        Route("/metrics", probes.metrics_endpoint, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers=EXCEPTION_HANDLERS, lifespan=lifespan)
    app.state.settings = settings
    app.state.store = active
    app.state.authorizer = Authorizer(active, settings)
    return app


def app_from_env() -> Starlette:
    """Factory for uvicorn worker processes: settings come from AFORO_* variables."""
    return create_app(load_settings())
