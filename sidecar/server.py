"""The composition root: the HTTP app with the gRPC server beside it, sharing one
store and one authorizer per process, and Postgres behind the admin API when it is
configured. Transports never import each other; this module wires them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette

from sidecar.authorizer import Authorizer
from sidecar.background import in_background
from sidecar.config import Settings, load_settings
from sidecar.grpc.contract import describe as grpc_contract
from sidecar.grpc.server import grpc_server
from sidecar.http.app import Service, create_app
from sidecar.http.decision_server import decision_server
from sidecar.store.base import Store, StoreUnavailable
from sidecar.store.factory import build_store
from sidecar.store.redis_store import RedisStore
from sidecar.tls import reload_on_sighup

log = logging.getLogger("aforo.server")


@contextlib.asynccontextmanager
async def _invalidations(settings: Settings, authorizer: Authorizer, store: Store) -> AsyncIterator[None]:
    """Drop this process's cached view of a consumer when any process changes it."""
    assert isinstance(store, RedisStore)

    async def listen() -> None:
        while True:
            try:
                # Plain pub/sub: on a cluster every node hears every PUBLISH, so one
                # subscription anywhere is enough; redis-py picks the node and the
                # loop moves to another when it is lost.
                client = (await store.open()).client
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(store.keys.invalidations())
                    async for message in pubsub.listen():
                        kind = message.get("type")
                        if kind == "subscribe":
                            # Subscribed (again): whatever was missed meanwhile is
                            # unknown, so the standing denials start empty.
                            authorizer.standing.clear()
                            authorizer.standing.live = settings.standing_denials
                        elif kind == "message":
                            message_id, _, target = message["data"].decode().rpartition(" ")
                            tenant, _, consumer_id = target.partition(":")
                            authorizer.forget_consumer(tenant, consumer_id)
                            if message_id:
                                await store.acknowledge_invalidation(message_id)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the subscription is best effort; keep trying
                log.warning("invalidation subscription lost (%s); resubscribing", exc)
                await asyncio.sleep(1)
            finally:
                # Not listening: no denial may be answered from memory.
                authorizer.standing.live = False

    try:
        async with in_background(listen()):
            yield
    finally:
        # Stopped, or left behind because its pub/sub close hangs: either way this
        # process no longer hears invalidations, so no denial is answered from memory.
        authorizer.standing.live = False


@contextlib.asynccontextmanager
async def _dirty_flusher(settings: Settings, authorizer: Authorizer, store: Store) -> AsyncIterator[None]:
    """Every 100 ms, tell the reconciler which streams this process appended to."""
    assert isinstance(store, RedisStore)

    async def flush_forever() -> None:
        while True:
            await asyncio.sleep(0.1)
            with contextlib.suppress(StoreUnavailable):
                await store.flush_dirty()

    async with in_background(flush_forever()):
        yield
    with contextlib.suppress(StoreUnavailable):
        await store.flush_dirty()  # what the last 100 ms marked


def build_app(settings: Settings, store: Store | None = None) -> Starlette:
    settings.check_serving()
    active = build_store(settings) if store is None else store
    services: list[Service] = []
    if store is None:

        @contextlib.asynccontextmanager
        async def closing(settings: Settings, authorizer: Authorizer, store: Store) -> AsyncIterator[None]:
            try:
                yield
            finally:
                await store.close()

        services.append(closing)  # entered first, so closed after every other service
    if settings.tls_cert_file is not None:
        services.append(reload_on_sighup)
    if settings.decision_port:
        services.append(decision_server)
    if settings.grpc_port:
        services.append(grpc_server)
    catalog = None
    if isinstance(active, RedisStore):
        services.append(_invalidations)
        services.append(_dirty_flusher)
    if settings.database_url is not None:
        from sidecar.reconciler.catalog import PostgresCatalog

        assert isinstance(active, RedisStore)  # Settings.validate guarantees it
        catalog = PostgresCatalog(settings, active)
        pg_catalog = catalog

        @contextlib.asynccontextmanager
        async def postgres(settings: Settings, authorizer: Authorizer, store: Store) -> AsyncIterator[None]:
            await pg_catalog.start()
            try:
                yield
            finally:
                await pg_catalog.close()

        services.append(postgres)
    return create_app(
        settings, active, services=services, catalog=catalog, contract_extensions={"x-grpc": grpc_contract()}
    )


def app_from_env() -> Starlette:
    """Factory for uvicorn worker processes: settings come from AFORO_* variables."""
    return build_app(load_settings())
