"""TLS for the three listeners (HTTP, decision port, gRPC) from one set of settings:
``tls_cert_file`` and ``tls_key_file`` (PEM) turn TLS on, ``tls_client_ca_file`` adds
mutual TLS (a client must present a certificate that CA signed). TLS 1.2 at least.

The files are read again on SIGHUP (``Certificates.reload``, installed by the app's
lifespan) without dropping a connection: every handshake from then on presents the new
certificate and trusts the new client CA, on all three listeners, while connections
already made go on with what they negotiated. Files that do not load are logged and
counted (``aforo_tls_reloads_total{result="failed"}``) and the certificates in use stay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from sidecar import metrics
from sidecar.config import Settings

log = logging.getLogger(__name__)


def load_context(cert_file: str, key_file: str, client_ca_file: str | None) -> ssl.SSLContext:
    """A server context from PEM files (raises ssl.SSLError, OSError or ValueError for
    files that do not load: the settings check runs it at start)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    if client_ca_file is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(client_ca_file)
    return context


def _context(settings: Settings) -> ssl.SSLContext:
    assert settings.tls_cert_file is not None and settings.tls_key_file is not None
    return load_context(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)


def _grpc_configuration(settings: Settings) -> grpc.ServerCertificateConfiguration:
    assert settings.tls_cert_file is not None and settings.tls_key_file is not None
    pair = (Path(settings.tls_key_file).read_bytes(), Path(settings.tls_cert_file).read_bytes())
    ca = None if settings.tls_client_ca_file is None else Path(settings.tls_client_ca_file).read_bytes()
    return grpc.ssl_server_certificate_configuration([pair], root_certificates=ca)


class Certificates:
    """The certificates every listener of this process presents, reloadable.

    The listeners are handed ``context`` once; it stays the context they wrap
    connections with, and its SNI callback (OpenSSL calls it on every ClientHello, with
    or without a server name) moves each new handshake onto the latest context loaded.
    gRPC asks ``_grpc_fetch`` before each handshake and gets a configuration only when a
    new one was loaded since it last asked."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.context = _context(settings)
        self._current = self.context
        self.context.sni_callback = self._choose
        self._grpc_initial = _grpc_configuration(settings)
        self._grpc_next: grpc.ServerCertificateConfiguration | None = None
        self._lock = threading.Lock()  # gRPC's fetcher runs on gRPC's own threads

    def _choose(self, connection: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
        if connection.context is not self._current:
            connection.context = self._current

    def _grpc_fetch(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            fresh, self._grpc_next = self._grpc_next, None
        return fresh

    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._grpc_initial,
            self._grpc_fetch,
            require_client_authentication=self.settings.tls_client_ca_file is not None,
        )

    def reload(self) -> bool:
        """Read the files again; False (and the old certificates kept) if they do not load."""
        try:
            fresh = _context(self.settings)
            configuration = _grpc_configuration(self.settings)
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.error("TLS reload failed, the certificates in use stay: %s", exc)
            metrics.TLS_RELOADS.labels("failed").inc()
            return False
        self._current = fresh
        with self._lock:
            self._grpc_next = configuration
        log.info("TLS certificates reloaded from %s", self.settings.tls_cert_file)
        metrics.TLS_RELOADS.labels("ok").inc()
        return True


_loaded: dict[tuple[str | None, ...], Certificates] = {}


def certificates(settings: Settings) -> Certificates | None:
    """This process's certificates (None: plain text): one object for every listener, so
    one reload reaches them all."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    files = (settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
    if files not in _loaded:
        _loaded[files] = Certificates(settings)
    return _loaded[files]


def server_context(settings: Settings) -> ssl.SSLContext | None:
    """The decision port's context (None: plain text)."""
    found = certificates(settings)
    return None if found is None else found.context


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The same for uvicorn's HTTP port. One process: the shared context (a SIGHUP
    reloads it). Several workers: each loads the files itself, and uvicorn's supervisor
    answers SIGHUP by bringing up new workers before retiring the old ones."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return {}
    if settings.workers == 1:
        return {"ssl_context_factory": _shared_context(settings)}
    options: dict[str, Any] = {"ssl_certfile": settings.tls_cert_file, "ssl_keyfile": settings.tls_key_file}
    if settings.tls_client_ca_file is not None:
        options |= {"ssl_ca_certs": settings.tls_client_ca_file, "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return options


def _shared_context(settings: Settings) -> Any:
    def factory(config: Any, default: Any) -> ssl.SSLContext:
        context = server_context(settings)
        assert context is not None
        return context

    return factory


def grpc_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """The gRPC port's credentials (None: plain text)."""
    found = certificates(settings)
    return None if found is None else found.grpc_credentials()


@contextlib.asynccontextmanager
async def reload_on_sighup(settings: Settings, *_: object) -> AsyncIterator[None]:
    """For the life of the app: SIGHUP reloads this process's certificates (a service of
    the app, so the handler runs on the serving loop)."""
    found = certificates(settings)
    loop = asyncio.get_running_loop()
    if found is not None:
        loop.add_signal_handler(signal.SIGHUP, found.reload)
    try:
        yield
    finally:
        if found is not None:
            loop.remove_signal_handler(signal.SIGHUP)
