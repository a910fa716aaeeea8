"""Shared fixtures: real Redis over real connections, a key prefix per test, sidecar
processes started as a user would start them."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import asyncpg
import httpx
import pytest
import redis

from sidecar.config import Settings, load_settings
from sidecar.http.app import create_app
from sidecar.store.base import Store
from sidecar.store.memory_store import MemoryStore
from sidecar.store.redis_store import RedisStore
from tests.redis_servers import (
    PrivateRedis,
    RedisClusterServers,
    SentinelServers,
    delete_prefix,
    free_port,
    running,
)

REDIS_URL = os.environ.get("AFORO_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
# A role allowed to create databases; each test that needs Postgres gets its own.
PG_URL = os.environ.get("AFORO_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
ADMIN_TOKEN = "test-admin-token-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def stop_process(proc: subprocess.Popen[Any] | None) -> None:
    """SIGTERM, then SIGKILL after 10 s: how every test ends a process it started."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def redis_url() -> str:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.ConnectionError as exc:  # pragma: no cover - environment problem
        pytest.fail(f"the tests need a running Redis at {REDIS_URL}: {exc}")
    finally:
        client.close()
    return REDIS_URL


# The shared cluster and Sentinel set, once started: each test's prefix is deleted there too.
_SHARED_URLS: list[str] = []


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; every key under it is deleted afterwards, on
    the shared Redis and on the shared cluster and Sentinel set."""
    value = f"test:{uuid.uuid4().hex[:12]}:"
    yield value
    for url in [redis_url, *_SHARED_URLS]:
        delete_prefix(url, value)


# Redis in each topology, and the stores every store test runs on: those and the
# embedded one.
DEPLOYMENTS = ["redis", "cluster", "sentinel"]
BACKENDS = ["memory", *DEPLOYMENTS]


def _deployment_url(name: str, request: pytest.FixtureRequest) -> str:
    if name == "cluster":
        return request.getfixturevalue("redis_cluster").url
    if name == "sentinel":
        return request.getfixturevalue("redis_sentinel").url
    return request.getfixturevalue("redis_url")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def backend_url(backend: str, request: pytest.FixtureRequest) -> str | None:
    """The Redis URL of the parametrised backend (None for the embedded store)."""
    return None if backend == "memory" else _deployment_url(backend, request)


@pytest.fixture(params=DEPLOYMENTS)
def deployment_url(request: pytest.FixtureRequest) -> str:
    """The URL of a shared Redis, cluster or Sentinel set (the test runs on each)."""
    return _deployment_url(request.param, request)


def make_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"admin_token": ADMIN_TOKEN, "decision_timeout_ms": 5000}
    values.update(overrides)
    return load_settings(values, environ={})


@pytest.fixture
async def store(backend_url: str | None, prefix: str) -> AsyncIterator[Store]:
    if backend_url is None:
        yield MemoryStore()
        return
    # A connect (for Sentinel: ask a sentinel, then reach the primary) may take longer
    # than the production default of 250 ms on a busy 2-core test machine.
    redis_store = RedisStore(backend_url, prefix=prefix, connect_timeout_s=2.0)
    await redis_store.load_scripts()
    yield redis_store
    await redis_store.close()


@pytest.fixture
def settings(backend_url: str | None, prefix: str) -> Settings:
    if backend_url is None:
        return make_settings()
    return make_settings(redis_url=backend_url, key_prefix=prefix)


@pytest.fixture
async def client(settings: Settings, store: Store) -> AsyncIterator[httpx.AsyncClient]:
    """The real app in process over the parametrised store."""
    app = create_app(settings, store)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://sidecar") as http:
        yield http


class SidecarProcess:
    def __init__(
        self, proc: subprocess.Popen[bytes], port: int, grpc_port: int, decision_port: int, log_path: str
    ) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.grpc_target = f"127.0.0.1:{grpc_port}"
        self.decision_port = decision_port
        self.decision_url = f"http://127.0.0.1:{decision_port}"
        self.log_path = log_path

    def stop(self) -> None:
        stop_process(self.proc)


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _read(path: str) -> str:
    with open(path) as file:
        return file.read()


@pytest.fixture
def start_sidecar(tmp_path: Any, prefix: str) -> Iterator[Callable[..., SidecarProcess]]:
    """Start `aforo-sidecar serve` as a separate process (as an operator would); stopped
    at the end of the test. It depends on ``prefix`` so that the processes stop (and
    make their last writes) before the test's keys are deleted."""
    started: list[SidecarProcess] = []

    def start(
        env: dict[str, str] | None = None, *args: str, probe: Callable[[SidecarProcess], bool] | None = None
    ) -> SidecarProcess:
        """``probe``: whether it is up (default: GET /healthz in plain HTTP answers 200)."""
        port, grpc_port, decision_port = free_port(), free_port(), free_port()
        log_path = str(tmp_path / f"sidecar-{port}.log")
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("AFORO_")}
        full_env.update(
            {
                "AFORO_ADMIN_TOKEN": ADMIN_TOKEN,
                "AFORO_LOG_LEVEL": "warning",
                "AFORO_GRPC_PORT": str(grpc_port),
                "AFORO_DECISION_PORT": str(decision_port),
            }
        )
        full_env.update(env or {})
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "sidecar.cli", "serve", "--port", str(port), *args],
                env=full_env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        sidecar = SidecarProcess(proc, port, grpc_port, decision_port, log_path)
        started.append(sidecar)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"sidecar exited: {_read(log_path)}")
            try:
                up = (
                    probe(sidecar)
                    if probe
                    else httpx.get(f"{sidecar.url}/healthz", timeout=0.5).status_code == 200
                )
                if up and (full_env["AFORO_GRPC_PORT"] == "0" or _accepts(int(full_env["AFORO_GRPC_PORT"]))):
                    return sidecar
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"sidecar did not start: {_read(log_path)}")

    yield start
    for sidecar in started:
        sidecar.stop()


@pytest.fixture
def private_redis(tmp_path) -> Iterator[PrivateRedis]:
    with running(PrivateRedis(str(tmp_path / "redis"))) as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    """A 3-master, 3-replica cluster shared by the tests that only read and write keys
    under their own prefix (failure tests start one of their own: private_cluster)."""
    with running(RedisClusterServers(str(tmp_path_factory.mktemp("cluster")))) as servers:
        _SHARED_URLS.append(servers.url)
        yield servers


@pytest.fixture(scope="session")
def redis_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelServers]:
    """A primary + replica + 3 Sentinels shared like redis_cluster."""
    with running(SentinelServers(str(tmp_path_factory.mktemp("sentinel")))) as servers:
        _SHARED_URLS.append(servers.url)
        yield servers


@pytest.fixture
def private_cluster(tmp_path) -> Iterator[RedisClusterServers]:
    with running(RedisClusterServers(str(tmp_path / "cluster"))) as servers:
        yield servers


@pytest.fixture
def private_sentinel(tmp_path) -> Iterator[SentinelServers]:
    with running(SentinelServers(str(tmp_path / "sentinel"))) as servers:
        yield servers


def _pg(sql: str, url: str = PG_URL) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


def database_in(url: str, name: str) -> str:
    return url.rsplit("/", 1)[0] + "/" + name


@pytest.fixture
def database_url() -> Iterator[str]:
    """A fresh, empty database of this test's own, dropped afterwards."""
    name = f"aforo_test_{uuid.uuid4().hex[:12]}"
    try:
        _pg(f"CREATE DATABASE {name}")
    except (OSError, asyncpg.PostgresError) as exc:  # pragma: no cover - environment problem
        pytest.fail(f"the tests need PostgreSQL at {PG_URL}: {exc}")
    yield database_in(PG_URL, name)
    _pg(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def migrated_database(database_url: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "sidecar.cli", "migrate", "--database-url", database_url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return database_url


class PrivatePostgres:
    """A PostgreSQL server of the test's own (initdb in a temporary folder, its own
    port), so a test can stop and restart it without touching the shared one."""

    def __init__(self) -> None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
        assert found, "PostgreSQL server binaries (initdb) are not installed"
        self.bin = os.path.dirname(found[-1])
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="aforo-pg-", dir="/tmp")
        self.data = os.path.join(self.dir, "data")
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._as_postgres = os.geteuid() == 0  # initdb refuses to run as root
        if self._as_postgres:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run("initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")

    def _run(self, tool: str, *args: str) -> None:
        command = [os.path.join(self.bin, tool), *args]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def require_tls(self, cert: str, key: str) -> None:
        """Serve TLS with this certificate and refuse every connection without it (the
        server reads the files as its own user, the key private to it)."""
        for source, name in ((cert, "server.crt"), (key, "server.key")):
            target = os.path.join(self.data, name)
            shutil.copy(source, target)
            os.chmod(target, 0o600)
            if self._as_postgres:
                shutil.chown(target, "postgres", "postgres")
        with open(os.path.join(self.data, "postgresql.conf"), "a") as conf:
            conf.write("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n")
        with open(os.path.join(self.data, "pg_hba.conf"), "w") as hba:
            rules = [
                "local all all trust",
                "hostssl all all 127.0.0.1/32 trust",
                "hostnossl all all 0.0.0.0/0 reject",
            ]
            hba.write("\n".join(rules) + "\n")

    def start(self) -> None:
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off"
        self._run(
            "pg_ctl", "-D", self.data, "-o", options, "-l", os.path.join(self.dir, "log"), "-w", "start"
        )

    def stop(self) -> None:
        self._run("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    server.start()
    yield server
    server.destroy()


async def seed(
    http: httpx.AsyncClient,
    *,
    plan_id: str = "plan",
    windows: dict[str, int] | None = None,
    price: int = 0,
    consumer_id: str = "c1",
    balance: int = 0,
    wallet_mode: str = "prepaid",
    products: list[str] | None = None,
    tenant: str = "default",
) -> None:
    """Create a plan and a consumer on it (and credit its wallet) through the admin API."""
    plan = {"windows": windows or {}, "price": price, "products": products or [], "tenant": tenant}
    response = await http.put(f"/v1/admin/plans/{plan_id}", json=plan, headers=ADMIN)
    assert response.status_code in (200, 201), response.text
    consumer = {"plan_id": plan_id, "wallet_mode": wallet_mode, "tenant": tenant}
    response = await http.put(f"/v1/admin/consumers/{consumer_id}", json=consumer, headers=ADMIN)
    assert response.status_code in (200, 201), response.text
    if balance:
        response = await http.post(
            f"/v1/admin/consumers/{consumer_id}/topup",
            json={"amount": balance, "tenant": tenant},
            headers=ADMIN,
        )
        assert response.status_code == 200, response.text


async def until(check: Callable[[], object], within: float, what: str, every: float = 0.05) -> float:
    """Poll until ``check()`` (sync or async) is truthy; returns the seconds it took."""
    started = time.monotonic()
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() - started > within:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(every)


class ReconcilerProcess:
    """`aforo-sidecar reconcile` as its own process, as it runs in production."""

    def __init__(self, env: dict[str, str], log_path: str) -> None:
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sidecar.cli", "reconcile"], env=self.env, stdout=log, stderr=log
            )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.fixture
def reconciler(tmp_path) -> Iterator[Callable[..., ReconcilerProcess]]:
    started: list[ReconcilerProcess] = []

    def make(database_url: str, redis_url: str, prefix: str, **extra: str) -> ReconcilerProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AFORO_")}
        env.update(
            {
                "AFORO_DATABASE_URL": database_url,
                "AFORO_REDIS_URL": redis_url,
                "AFORO_KEY_PREFIX": prefix,
                "AFORO_DRAIN_INTERVAL_MS": "50",
                "AFORO_LOG_LEVEL": "info",
                # Off unless a test asks (tests/test_monitoring.py): two at once would share 9466.
                "AFORO_RECONCILER_METRICS_PORT": "0",
                **extra,
            }
        )
        process = ReconcilerProcess(env, str(tmp_path / f"reconciler-{len(started)}.log"))
        started.append(process)
        process.start()
        return process

    yield make
    for process in started:
        process.stop()


APIGEE_TOKEN = "ya29.apigee-token-0123456789"


@pytest.fixture
def apigee() -> Iterator[Any]:
    """A stub of Apigee's Management API (tests/stubs/apigee_mgmt.py) as a process: X,
    organization ``acme``, bearer APIGEE_TOKEN."""
    from tests.stubs import StubServer

    server = StubServer("apigee_mgmt")
    server.faults(token=APIGEE_TOKEN, api="x", organization="acme")
    yield server
    server.stop()
