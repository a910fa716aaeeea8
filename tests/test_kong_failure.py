"""The sidecar down, hung or restarting, through the real plugin server: fail open
passes within the timeout (plus a generous margin for a loaded machine), fail closed
answers 503, and decisions resume when the sidecar is back."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.conftest import delete_prefix
from tests.kong.emulator import KongRequest
from tests.kong.harness import PluginServer, Sidecar, plugin_server, sidecar_config, silent_port, unique

# Scheduling slack on a loaded 2-core machine; speed itself is measured by the benchmark.
MARGIN_S = 0.150


@pytest.fixture(scope="module")
def server() -> Iterator[PluginServer]:
    with plugin_server() as running:
        yield running


@pytest.fixture
def sidecar(redis_url: str, prefix: str, tmp_path) -> Iterator[Sidecar]:
    process = Sidecar(str(tmp_path), {"AFORO_REDIS_URL": redis_url, "AFORO_KEY_PREFIX": prefix})
    process.start()
    yield process
    process.stop()


def request() -> KongRequest:
    return KongRequest(consumer={"id": "c1"})


def seeded(sidecar: Sidecar, limit: int = 100) -> None:
    admin = sidecar.admin()
    admin.plan("plan", {"day": limit})
    admin.consumer("c1", "plan")


def test_sidecar_stopped_fail_open_passes_within_the_timeout(server, sidecar):
    seeded(sidecar)
    instance = server.kong.start_instance(sidecar_config(sidecar, timeout_ms=50, fail_mode="open"))
    assert server.kong.play(instance, request()).header("X-RateLimit-Remaining-Day") == "99"
    sidecar.stop()
    exchanges = [server.kong.play(instance, request()) for _ in range(5)]
    for exchange in exchanges:
        assert exchange.proxied and exchange.status == 200
        assert exchange.header("X-RateLimit-Remaining-Day") is None
        assert exchange.access.seconds < 0.050 + MARGIN_S


def test_sidecar_stopped_fail_closed_answers_503(server, sidecar):
    seeded(sidecar)
    instance = server.kong.start_instance(sidecar_config(sidecar, timeout_ms=50, fail_mode="closed"))
    assert server.kong.play(instance, request()).proxied
    sidecar.stop()
    for _ in range(3):
        exchange = server.kong.play(instance, request())
        assert exchange.status == 503
        assert exchange.exit.body == {"message": "Quota service unavailable", "reason": "sidecar_unavailable"}
        assert exchange.header("Retry-After") == "1"
        assert exchange.access.seconds < 0.050 + MARGIN_S


@pytest.mark.parametrize("fail_mode", ["open", "closed"])
def test_a_hung_sidecar_costs_at_most_the_timeout(server, fail_mode):
    """A sidecar that accepts connections and never answers: the gRPC deadline ends the
    wait, and no HTTP fallback is tried with a spent budget."""
    with silent_port() as grpc_port, silent_port() as http_port:
        instance = server.kong.start_instance(
            {
                "grpc_target": f"127.0.0.1:{grpc_port}",
                "http_url": f"http://127.0.0.1:{http_port}",
                "timeout_ms": 100,
                "fail_mode": fail_mode,
                "product": "catalog",
                "usage": False,
            }
        )
        for _ in range(3):
            exchange = server.kong.play(instance, request())
            assert exchange.access.seconds >= 0.095  # it did wait for the sidecar
            assert exchange.access.seconds < 0.100 + MARGIN_S
            if fail_mode == "open":
                assert exchange.proxied
            else:
                assert (exchange.status, exchange.exit.body["reason"]) == (503, "sidecar_unavailable")


def test_a_hung_http_fallback_is_bounded_by_the_same_budget(server):
    with silent_port() as http_port:
        instance = server.kong.start_instance(
            {
                "protocol": "http",
                "http_url": f"http://127.0.0.1:{http_port}",
                "timeout_ms": 80,
                "fail_mode": "closed",
                "product": "catalog",
                "usage": False,
            }
        )
        exchange = server.kong.play(instance, request())
    assert (exchange.status, exchange.exit.body["reason"]) == (503, "sidecar_unavailable")
    assert 0.075 <= exchange.access.seconds < 0.080 + MARGIN_S


def test_decisions_resume_when_the_sidecar_is_back(server, sidecar):
    seeded(sidecar, limit=1000)
    instance = server.kong.start_instance(
        sidecar_config(sidecar, timeout_ms=200, fail_mode="open", usage=False)
    )
    assert server.kong.play(instance, request()).header("X-RateLimit-Remaining-Day") == "999"
    sidecar.stop()
    assert server.kong.play(instance, request()).header("X-RateLimit-Remaining-Day") is None
    sidecar.start()  # same ports
    deadline = time.monotonic() + 20
    while True:
        exchange = server.kong.play(instance, request())
        if exchange.header("X-RateLimit-Remaining-Day") is not None or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    # Only the decisions the sidecar made were counted (fail-open passes are not).
    assert exchange.header("X-RateLimit-Remaining-Day") == "998"


def test_the_sidecars_own_fail_mode_passes_through(server, redis_url, tmp_path):
    """Redis unreachable behind the sidecar: the sidecar answers per its own fail mode
    (closed: 503 store_unavailable) and the plugin forwards that decision."""
    prefix = f"test:{unique('kong')}:"
    dead_redis = "redis://127.0.0.1:1/0"
    process = Sidecar(
        str(tmp_path),
        {"AFORO_REDIS_URL": dead_redis, "AFORO_KEY_PREFIX": prefix, "AFORO_FAIL_MODE": "closed"},
    )
    process.start()
    try:
        instance = server.kong.start_instance(sidecar_config(process, product="catalog", usage=False))
        exchange = server.kong.play(instance, request())
    finally:
        process.stop()
        delete_prefix(redis_url, prefix)
    assert (exchange.status, exchange.exit.body["reason"]) == (503, "store_unavailable")
    assert exchange.header("Retry-After") == "1"
