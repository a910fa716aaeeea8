"""The composition root: the HTTP app with the gRPC server beside it, sharing one
store and one authorizer per process. Transports never import each other; this does."""

from __future__ import annotations

from starlette.applications import Starlette

from sidecar.config import Settings, load_settings
from sidecar.grpc.server import grpc_server
from sidecar.http.app import create_app
from sidecar.store.base import Store


def build_app(settings: Settings, store: Store | None = None) -> Starlette:
    return create_app(settings, store, services=[grpc_server] if settings.grpc_port else [])


def app_from_env() -> Starlette:
    """Factory for uvicorn worker processes: settings come from AFORO_* variables."""
    return build_app(load_settings())
