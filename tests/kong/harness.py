"""Test helpers around the emulator: a real sidecar process (restartable on the same
ports), the sidecar's admin API, the plugin server with its emulator, and what the
sidecar stored (read back through the product's own RedisStore)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from sidecar.core.models import UsageEvent
from sidecar.store.redis_store import RedisStore
from tests.conftest import ADMIN, ADMIN_TOKEN, delete_prefix, free_port, stop_process
from tests.kong.emulator import KongEmulator, PluginServerProcess, query_plugin_info


def unique(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:10]}"


def short_dir() -> str:
    """A directory for the plugin server's socket: unix socket paths are limited to
    108 bytes, which pytest's tmp_path can exceed."""
    return tempfile.mkdtemp(prefix="kong-", dir="/tmp")


class Sidecar:
    """`aforo-sidecar serve` as a process, stoppable and restartable on the same ports."""

    def __init__(
        self, log_dir: str, env: dict[str, str], grpc: bool = True, verify: ssl.SSLContext | None = None
    ) -> None:
        """``verify``: the sidecar speaks TLS (its env names the certificates); the
        context the tests' own calls trust it with (and present a client certificate)."""
        self.port = free_port()
        self.grpc_port = free_port() if grpc else 0
        self.decision_port = free_port()
        self.verify = verify
        scheme = "http" if verify is None else "https"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.decision_url = f"{scheme}://127.0.0.1:{self.decision_port}"
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        self.log_path = Path(log_dir) / f"sidecar-{self.port}.log"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("AFORO_")}
        self.env.update(
            {
                "AFORO_ADMIN_TOKEN": ADMIN_TOKEN,
                "AFORO_LOG_LEVEL": "warning",
                "AFORO_GRPC_PORT": str(self.grpc_port),
                # Never the default 8081: other sidecars (other tests) may hold it.
                "AFORO_DECISION_PORT": str(self.decision_port),
                "AFORO_DECISION_TIMEOUT_MS": "2000",
                **env,
            }
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Sidecar:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sidecar.cli", "serve", "--port", str(self.port)],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sidecar exited: {self.log_path.read_text()}")
            try:
                healthy = (
                    httpx.get(f"{self.url}/healthz", timeout=0.5, verify=self.verify or True).status_code
                    == 200
                )
            except httpx.HTTPError:
                healthy = False
            if healthy and (not self.grpc_port or _accepts(self.grpc_port)) and _accepts(self.decision_port):
                return self
            time.sleep(0.05)
        raise RuntimeError(f"sidecar did not start: {self.log_path.read_text()}")

    def stop(self) -> None:
        stop_process(self.proc)

    def admin(self) -> Admin:
        return Admin(self.url, self.verify)


@contextlib.contextmanager
def module_sidecar(
    redis_url: str, folder: str, label: str, verify: ssl.SSLContext | None = None, **env: str
) -> Iterator[Sidecar]:
    """One sidecar process for a test module, on a key prefix of its own (deleted after);
    tests isolate their data with ids of their own. ``prefix`` is set on it."""
    prefix = f"test:{unique(label)}:"
    process = Sidecar(
        folder, {"AFORO_REDIS_URL": redis_url, "AFORO_KEY_PREFIX": prefix, **env}, verify=verify
    )
    process.prefix = prefix  # type: ignore[attr-defined]
    process.start()
    try:
        yield process
    finally:
        process.stop()
        delete_prefix(redis_url, prefix)


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A port nothing listens on: bound but never listening, so no one else takes it
    and connections to it are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@contextlib.contextmanager
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel completes the handshake) and never
    answers: a hung sidecar."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        yield sock.getsockname()[1]


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


class Admin:
    """The sidecar's admin API, synchronously."""

    def __init__(self, url: str, verify: ssl.SSLContext | None = None) -> None:
        self.http = httpx.Client(base_url=url, headers=ADMIN, timeout=10, verify=verify or True)

    def _ok(self, response: httpx.Response) -> dict[str, Any]:
        assert response.status_code in (200, 201), response.text
        return response.json()

    def plan(self, plan_id: str, windows: dict[str, int] | None = None, price: int = 0, **extra: Any) -> None:
        body = {"windows": windows or {}, "price": price, **extra}
        self._ok(self.http.put(f"/v1/admin/plans/{plan_id}", json=body))

    def consumer(
        self, consumer_id: str, plan_id: str, wallet_mode: str = "prepaid", balance: int = 0
    ) -> None:
        self._ok(
            self.http.put(
                f"/v1/admin/consumers/{consumer_id}", json={"plan_id": plan_id, "wallet_mode": wallet_mode}
            )
        )
        if balance:
            self._ok(self.http.post(f"/v1/admin/consumers/{consumer_id}/topup", json={"amount": balance}))

    def suspend(self, consumer_id: str) -> None:
        self._ok(self.http.post(f"/v1/admin/consumers/{consumer_id}/suspend", json={"reason": "test"}))

    def key(self, consumer_id: str) -> str:
        return self._ok(self.http.post(f"/v1/admin/consumers/{consumer_id}/keys", json={}))["api_key"]

    def view(self, consumer_id: str) -> dict[str, Any]:
        return self._ok(self.http.get(f"/v1/admin/consumers/{consumer_id}"))


class PluginServer:
    """The real plugin server process and an emulated Kong talking to it."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.dir = short_dir()
        self.info = query_plugin_info()
        self.process = PluginServerProcess(self.dir, env=env).start()
        self.kong = KongEmulator(self.process.socket_path, self.info)

    def stop(self) -> int:
        self.kong.close()
        return self.process.stop()

    def final_stats(self) -> dict[str, int]:
        """The usage counters the plugin server logs when it stops (the last line)."""
        lines = re.findall(r"usage stats: (.*)", self.process.log_text())
        assert lines, self.process.log_text()
        return {name: int(value) for name, value in (item.split("=") for item in lines[-1].split())}

    def cleanup(self) -> None:
        self.process.kill()
        self.kong.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def plugin_server(env: dict[str, str] | None = None) -> Iterator[PluginServer]:
    server = PluginServer(env)
    try:
        yield server
    finally:
        server.cleanup()


def sidecar_config(sidecar: Sidecar, **overrides: Any) -> dict[str, Any]:
    """A plugin config pointing at this sidecar. Tests that count decisions use a wide
    timeout, so a loaded machine never turns a decision into a fail-open pass."""
    config: dict[str, Any] = {
        "grpc_target": sidecar.grpc_target,
        "http_url": sidecar.url,
        "timeout_ms": 3000,
        "usage_flush_interval_ms": 50,
    }
    config.update(overrides)
    return config


def stored_events(redis_url: str, prefix: str, consumer_id: str, tenant: str = "default") -> list[UsageEvent]:
    async def read() -> list[UsageEvent]:
        store = RedisStore(redis_url, prefix=prefix)
        try:
            return await store.events(tenant, consumer_id)
        finally:
            await store.close()

    return asyncio.run(read())


def wait_for_events(
    redis_url: str, prefix: str, consumer_id: str, count: int, timeout: float = 20.0
) -> list[UsageEvent]:
    deadline = time.monotonic() + timeout
    while True:
        events = stored_events(redis_url, prefix, consumer_id)
        if len(events) >= count or time.monotonic() > deadline:
            return events
        time.sleep(0.05)


def fresh_minute(margin_s: int = 10) -> None:
    """Wait for a new minute when fewer than ``margin_s`` seconds are left of this one,
    so a per-minute quota test never straddles a window boundary."""
    now = datetime.now(UTC)
    if now.second >= 60 - margin_s:
        time.sleep(60 - now.second - now.microsecond / 1e6 + 0.05)
