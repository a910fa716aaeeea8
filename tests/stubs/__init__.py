"""Stub servers of gateway management APIs (each file names the documentation it
follows), run as real processes on loopback and controlled over their ``/_stub/``
endpoints."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import httpx

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
