"""Before anything is printed or started: is each port the sidecar will listen on free?

A busy port otherwise surfaces as an OSError traceback from deep in the server, after
the start banner (and, for `demo`, after the admin token) has been printed."""

from __future__ import annotations

import socket

from sidecar.config import Settings

# port setting -> how an operator changes it
_PORTS = {
    "port": "the HTTP port: set AFORO_PORT or --port",
    "decision_port": "the decision port: set AFORO_DECISION_PORT or --decision-port (0 turns it off)",
    "grpc_port": "the gRPC port: set AFORO_GRPC_PORT or --grpc-port (0 turns it off)",
}


def _bindable(host: str, port: int) -> bool:
    for family, kind, proto, _, address in socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    ):
        with socket.socket(family, kind, proto) as sock:
            # As the servers bind: a port in TIME_WAIT is free, one with a listener is not.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
            except OSError:
                return False
    return True


def busy_port(settings: Settings) -> str | None:
    """A one-line message naming the first port already taken, or None."""
    for name, change in _PORTS.items():
        port = getattr(settings, name)
        if port and not _bindable(settings.host, port):
            return f"port {port} on {settings.host} is already in use ({change})"
    return None
