"""Pub/sub invalidation reaches every sidecar process whatever the topology: on a
cluster a plain PUBLISH on any node is heard by a subscriber on any other node."""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis

from sidecar.authorizer import Authorizer
from sidecar.server import _invalidations
from sidecar.store import redis_store
from sidecar.store.redis_store import RedisStore
from tests.conftest import make_settings


async def _heard(authorizer: Authorizer, owner_key: str, publish) -> float:  # type: ignore[no-untyped-def]
    """Publish until the subscriber has dropped ``owner_key`` (it subscribes in the
    background); the seconds it took."""
    started = time.monotonic()
    while owner_key in authorizer._key_owner:
        assert time.monotonic() - started < 5, "the invalidation was never heard"
        await publish()
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def test_an_invalidation_is_heard_by_every_process(deployment_url, prefix):
    listening = RedisStore(deployment_url, prefix=prefix)
    publishing = RedisStore(deployment_url, prefix=prefix)
    settings = make_settings(redis_url=deployment_url, key_prefix=prefix)
    authorizer = Authorizer(listening, settings)
    try:
        async with _invalidations(settings, authorizer, listening):
            authorizer._key_owner["default:" + "a" * 64] = "c1"
            authorizer._key_owner["default:" + "b" * 64] = "c2"
            await _heard(
                authorizer, "default:" + "a" * 64, lambda: publishing.publish_invalidation("default", "c1")
            )
            assert authorizer._key_owner == {"default:" + "b" * 64: "c2"}  # only c1's entries
            backend = await publishing.open()
            if backend.target.topology == "cluster":
                # A PUBLISH on each master in turn: the one subscription hears them all.
                channel = listening.keys.invalidations()
                for node in await backend.router.masters():
                    assert node.address is not None
                    host, port = node.address
                    direct = aioredis.Redis(host=host, port=port)
                    authorizer._key_owner["default:" + "c" * 64] = "c3"
                    await _heard(
                        authorizer,
                        "default:" + "c" * 64,
                        lambda direct=direct: direct.publish(channel, "default:c3"),
                    )
                    await direct.aclose()
    finally:
        await listening.close()
        await publishing.close()


async def test_an_admin_change_waits_until_every_listener_has_dropped_it(deployment_url, prefix, monkeypatch):
    monkeypatch.setattr(redis_store, "INVALIDATION_WAIT_S", 2.0)  # far from an acknowledgement's time
    listening = RedisStore(deployment_url, prefix=prefix)
    publishing = RedisStore(deployment_url, prefix=prefix)
    settings = make_settings(redis_url=deployment_url, key_prefix=prefix)
    authorizer = Authorizer(listening, settings)
    backend = await publishing.open()
    silent = backend.client.pubsub()
    try:
        async with _invalidations(settings, authorizer, listening):
            authorizer._key_owner["default:" + "a" * 64] = "c1"
            await _heard(
                authorizer, "default:" + "a" * 64, lambda: publishing.publish_invalidation("default", "c1")
            )
            assert authorizer.standing.live  # subscribed: the standing denials are usable
            started = time.monotonic()
            await publishing.publish_invalidation("default", "c2", wait=True)
            assert time.monotonic() - started < 1.5
            if backend.target.topology != "cluster":
                # PUBLISH counts every listener here (on a cluster, only the node's): a
                # subscriber that never acknowledges makes the wait run to its bound.
                await silent.subscribe(listening.keys.invalidations())
                await silent.get_message(timeout=1)  # the subscription's confirmation
                started = time.monotonic()
                await publishing.publish_invalidation("default", "c3", wait=True)
                assert 2.0 <= time.monotonic() - started < 4
        assert not authorizer.standing.live  # not listening any more: not usable
    finally:
        await silent.aclose()
        await listening.close()
        await publishing.close()


async def test_with_standing_denials_off_the_memory_is_never_used(redis_url, prefix):
    store = RedisStore(redis_url, prefix=prefix)
    settings = make_settings(redis_url=redis_url, key_prefix=prefix, standing_denials=False)
    authorizer = Authorizer(store, settings)
    try:
        async with _invalidations(settings, authorizer, store):
            authorizer._key_owner["default:" + "a" * 64] = "c1"
            await _heard(
                authorizer, "default:" + "a" * 64, lambda: store.publish_invalidation("default", "c1")
            )
            assert not authorizer.standing.live  # subscribed, but switched off
    finally:
        await store.close()
