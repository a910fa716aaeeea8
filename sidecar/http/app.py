"""The Starlette application."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.routing import Route

from sidecar.authorizer import Authorizer
from sidecar.catalog import Catalog, StoreCatalog
from sidecar.config import Settings
from sidecar.http import (
    admin,
    alerts,
    connections,
    decisions,
    ingest,
    introspection,
    openapi,
    probes,
    reconciliation,
    tokens,
    usage,
    usage_query,
)
from sidecar.http.access import Gate, protect
from sidecar.http.errors import EXCEPTION_HANDLERS
from sidecar.integrations.apigee import routes as apigee_routes
from sidecar.integrations.kong import routes as kong_routes
from sidecar.store.base import Store, StoreUnavailable
from sidecar.store.factory import build_store
from sidecar.store.redis_store import RedisStore
from sidecar.store.topology import TopologyError

log = logging.getLogger("aforo.http")


# A service started beside HTTP for the app's lifetime (the composition root passes
# the gRPC server): it gets the shared authorizer and store.
Service = Callable[[Settings, Authorizer, Store], contextlib.AbstractAsyncContextManager[object]]


def create_app(
    settings: Settings,
    store: Store | None = None,
    services: Sequence[Service] = (),
    catalog: Catalog | None = None,
    contract_extensions: dict[str, Any] | None = None,
) -> Starlette:
    """The app over ``store`` (built from the settings when not given; closed on exit).
    ``catalog`` is the admin write path; by default the store alone.
    ``contract_extensions``: more of the API for /openapi.json (the gRPC side)."""
    owned = store is None
    active: Store = build_store(settings) if store is None else store
    writes: Catalog = StoreCatalog(active) if catalog is None else catalog
    authorizer = Authorizer(active, settings, writes.get_token)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if isinstance(active, RedisStore):
            try:
                await active.load_scripts()
            except TopologyError:
                raise  # a setting the Redis found contradicts: stop with the message
            except StoreUnavailable as exc:
                # Start anyway: decisions follow the fail mode until Redis answers.
                log.warning("redis unreachable at start (%s); serving in fail mode", exc)
        async with contextlib.AsyncExitStack() as stack:
            for service in services:
                await stack.enter_async_context(service(settings, authorizer, active))
            yield
        if owned:
            await active.close()

    routes = [
        Route("/v1/authorize", decisions.authorize, methods=["POST"]),
        *tokens.ROUTES,
        *introspection.ROUTES,
        Route("/integrations/apigee/authorize", decisions.apigee_authorize, methods=["POST"]),
        Route("/v1/usage", usage.report_usage, methods=["POST"]),
        *admin.ROUTES,
        *usage_query.ROUTES,
        *connections.ROUTES,
        *alerts.ROUTES,
        *reconciliation.ROUTES,
        *kong_routes.ROUTES,
        *apigee_routes.ROUTES,
        Route("/healthz", probes.healthz, methods=["GET"]),
        Route("/readyz", probes.readyz, methods=["GET"]),
        Route("/metrics", probes.metrics_endpoint, methods=["GET"]),
        *openapi.ROUTES,
    ]
    app = Starlette(routes=protect(routes), exception_handlers=EXCEPTION_HANDLERS, lifespan=lifespan)
    app.state.openapi = msgspec.json.encode(openapi.document(routes, contract_extensions))
    app.state.gate = Gate(settings.auth_failure_limit)
    app.state.introspection_limit = introspection.PerSecond(settings.introspect_per_second)
    app.state.settings = settings
    app.state.store = active
    app.state.authorizer = authorizer
    app.state.ingest_in_flight = ingest.InFlight(settings.ingest_max_in_flight)
    app.state.catalog = writes
    return app
