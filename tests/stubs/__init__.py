"""Stub servers of gateway management APIs (each file names the documentation it
follows), run as real processes on loopback and controlled over their ``/_stub/``
endpoints."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.redis_servers import free_port


class StubServer:
    """``python -m tests.stubs.<module> --port <free port>``, stopped by PID."""

    def __init__(self, module: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", f"tests.stubs.{module}", "--port", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.control = httpx.Client(base_url=self.url, timeout=5)
        deadline = time.monotonic() + 15
        while True:
            try:
                self.control.get("/_stub/calls")
                return
            except httpx.TransportError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"stub {module} did not start") from None
                time.sleep(0.05)

    def state(self, **state: Any) -> None:
        self.control.put("/_stub/state", json=state).raise_for_status()

    def faults(self, **faults: Any) -> None:
        self.control.put("/_stub/faults", json=faults).raise_for_status()

    def current(self) -> dict[str, Any]:
        """The stub's state now (what the sidecar's writes made of it)."""
        return self.control.get("/_stub/state").json()

    def calls(self) -> list[dict[str, Any]]:
        return self.control.get("/_stub/calls").json()

    def stop(self) -> None:
        self.control.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def stub_app(
    api: Callable[..., Any], methods: list[str], calls: list[dict[str, Any]], **control: Any
) -> Starlette:
    """A stub's app: its gateway API on every path but ``/_stub/``, whose ``state`` and
    ``faults`` (PUT) are the stub's own handlers and ``calls`` (GET) lists ``calls``;
    ``get_state`` (GET /_stub/state) when given."""

    async def get_calls(request: Request) -> Response:
        return JSONResponse(calls)

    routes = [
        Route("/_stub/state", control["put_state"], methods=["PUT"]),
        Route("/_stub/faults", control["put_faults"], methods=["PUT"]),
        Route("/_stub/calls", get_calls, methods=["GET"]),
    ]
    if "get_state" in control:
        routes.append(Route("/_stub/state", control["get_state"], methods=["GET"]))
    return Starlette(routes=[*routes, Route("/{path:path}", api, methods=methods)])


def run_stub(app: Starlette, description: str) -> None:
    """``--port N``: serve ``app`` on loopback until terminated."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
