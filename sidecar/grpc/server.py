"""The grpc.aio server: Sidecar, Envoy's RateLimitService, health and reflection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sidecar.authorizer import Authorizer
from sidecar.background import in_background
from sidecar.config import Settings
from sidecar.grpc.gen.aforo.sidecar.v1 import sidecar_pb2, sidecar_pb2_grpc
from sidecar.grpc.gen.envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from sidecar.grpc.ratelimit_service import RateLimitService
from sidecar.grpc.sidecar_service import SidecarService
from sidecar.store.base import Store, StoreUnavailable
from sidecar.tls import grpc_credentials

log = logging.getLogger("aforo.grpc")
SIDECAR = sidecar_pb2.DESCRIPTOR.services_by_name["Sidecar"].full_name
RATE_LIMIT = rls_pb2.DESCRIPTOR.services_by_name["RateLimitService"].full_name
HEALTH_INTERVAL_S = 1.0


async def _watch_store(store: Store, servicer: health.aio.HealthServicer) -> None:
    """Keep the health status in step with the store: NOT_SERVING while it is down."""
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    last = None
    while True:
        try:
            await asyncio.wait_for(store.ping(), timeout=HEALTH_INTERVAL_S)
            status = serving
        except (StoreUnavailable, TimeoutError):
            status = not_serving
        if status != last:
            for name in ("", SIDECAR, RATE_LIMIT):
                await servicer.set(name, status)
            log.info("grpc health: %s", health_pb2.HealthCheckResponse.ServingStatus.Name(status))
            last = status
        await asyncio.sleep(HEALTH_INTERVAL_S)


@contextlib.asynccontextmanager
async def grpc_server(settings: Settings, authorizer: Authorizer, store: Store) -> AsyncIterator[int]:
    """Serve gRPC on ``settings.host:settings.grpc_port`` for the life of the block;
    yields the bound port. With several workers, each binds the same port with
    SO_REUSEPORT and the kernel spreads connections among them; with one, the option is
    off so that a port already taken by another program is an error, not a silent share."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1 if settings.workers > 1 else 0)])
    sidecar_pb2_grpc.add_SidecarServicer_to_server(SidecarService(authorizer, store, settings), server)
    rls_pb2_grpc.add_RateLimitServiceServicer_to_server(RateLimitService(authorizer), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SIDECAR, RATE_LIMIT, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{settings.host}:{settings.grpc_port}"
    credentials = grpc_credentials(settings)
    port = (
        server.add_insecure_port(address)
        if credentials is None
        else server.add_secure_port(address, credentials)
    )
    await server.start()
    log.info("grpc listening on %s:%d", settings.host, port)
    try:
        async with in_background(_watch_store(store, health_servicer)):
            yield port
    finally:
        await server.stop(grace=2)
