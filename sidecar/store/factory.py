"""Choose and open the hot store the settings ask for."""

from __future__ import annotations

from sidecar.config import Settings
from sidecar.store.base import Store
from sidecar.store.memory_store import MemoryStore
from sidecar.store.redis_store import RedisStore


def build_store(settings: Settings) -> Store:
    if settings.redis_url is None:
        return MemoryStore()
    return RedisStore(
        settings.redis_target(),
        prefix=settings.key_prefix,
        connect_timeout_s=settings.redis_connect_timeout_ms / 1000,
        # A decision gives up at its own deadline; this only bounds admin calls.
        socket_timeout_s=max(1.0, settings.decision_timeout_ms / 1000),
        max_connections=settings.redis_max_connections,
        breaker_cooldown_s=settings.breaker_cooldown_ms / 1000,
    )
