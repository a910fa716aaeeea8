"""Hot stores behind one protocol: Redis (shared, production) and memory (embedded)."""

from sidecar.store.base import DecisionCall, Store, StoreUnavailable

__all__ = ["DecisionCall", "Store", "StoreUnavailable"]
