"""TLS for the three listeners (HTTP, decision port, gRPC) from one set of settings:
``tls_cert_file`` and ``tls_key_file`` (PEM) turn TLS on, ``tls_client_ca_file`` adds
mutual TLS (a client must present a certificate that CA signed). TLS 1.2 at least."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import grpc

from sidecar.config import Settings


def server_context(settings: Settings) -> ssl.SSLContext | None:
    """The decision port's context (None: plain text)."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    if settings.tls_client_ca_file is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(settings.tls_client_ca_file)
    return context


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The same for uvicorn's HTTP port (its own context: TLS 1.2 at least is Python's
    default for a server context)."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return {}
    options: dict[str, Any] = {"ssl_certfile": settings.tls_cert_file, "ssl_keyfile": settings.tls_key_file}
    if settings.tls_client_ca_file is not None:
        options |= {"ssl_ca_certs": settings.tls_client_ca_file, "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return options


def grpc_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """The gRPC port's credentials (None: plain text)."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    pair = (Path(settings.tls_key_file).read_bytes(), Path(settings.tls_cert_file).read_bytes())
    ca = None if settings.tls_client_ca_file is None else Path(settings.tls_client_ca_file).read_bytes()
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)
