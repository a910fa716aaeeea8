"""Overhead of the Kong plugin, measured through the real kong-pdk plugin server.

Drives requests through the Kong emulator (tests/kong/emulator.py) into the real plugin
server and a real sidecar process on Redis, and reports, per phase, the PDK calls and
RPC round trips per request and the time Kong would wait on the plugin server. The
sidecar's own answer time on each transport (the plugin's client called from this
process, no Kong) is measured too, so the plugin's share of the access phase is visible.

    python loadtests/kong_plugin_bench.py                  # 10,000 requests, Redis at 127.0.0.1:6379
    python loadtests/kong_plugin_bench.py --requests 2000 --redis-url redis://127.0.0.1:6379/0

This is a benchmark, not a test: it asserts only that every decision was made and
every usage event arrived. Kong's side of each RPC is played by Python here (msgpack in
Python instead of LuaJIT), so the figures are an upper bound of what Kong adds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kong_plugin.client import Address, Ask, SidecarClient  # noqa: E402
from sidecar.store.redis_store import RedisStore  # noqa: E402
from tests.conftest import delete_prefix  # noqa: E402
from tests.kong.emulator import Exchange, KongRequest  # noqa: E402
from tests.kong.harness import PluginServer, Sidecar, sidecar_config  # noqa: E402


def percentiles(samples: Sequence[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6

    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "mean": statistics.fmean(ordered) * 1e6}


def row(label: str, samples: Sequence[float], extra: str = "") -> str:
    p = percentiles(samples)
    return f"| {label} | {p['p50']:.0f} | {p['p90']:.0f} | {p['p99']:.0f} | {p['mean']:.0f} | {extra} |"


WARM_UP = 200


def direct_clients(sidecar: Sidecar) -> dict[str, SidecarClient]:
    """The plugin's own client on each transport, called from this process without the
    plugin server or Kong: the sidecar's own answer, which the access phase adds to."""
    return {
        "grpc": SidecarClient(Address(sidecar.grpc_target, sidecar.url, "grpc", False)),
        "http": SidecarClient(Address(sidecar.grpc_target, sidecar.url, "http", False)),
        "decision port": SidecarClient(
            Address(sidecar.grpc_target, sidecar.url, "http", False, sidecar.decision_url)
        ),
    }


def run(
    server: PluginServer,
    configs: Sequence[dict],
    direct: dict[str, SidecarClient],
    count: int,
    make: Callable[[int], KongRequest],
) -> tuple[list[list[Exchange]], dict[str, list[float]]]:
    """``count`` requests through each configuration and each direct client,
    interleaved, so a change in the machine's load (it is shared) weighs on every
    configuration alike."""
    instances = [server.kong.start_instance(config) for config in configs]
    ask = Ask(
        tenant="default", product="catalog", consumer_id="bench-consumer", api_key=None, cost=None, hits=1
    )
    results: list[list[Exchange]] = [[] for _ in instances]
    answers: dict[str, list[float]] = {name: [] for name in direct}
    for i in range(-WARM_UP, count):  # the warm-up: the channels, the pools, the caches
        for instance, exchanges in zip(instances, results, strict=True):
            exchange = server.kong.play(instance, make(i))
            if i >= 0:
                exchanges.append(exchange)
        for name, client in direct.items():
            started = time.perf_counter()
            client.authorize(ask, 2.0)
            if i >= 0:
                answers[name].append(time.perf_counter() - started)
    return results, answers


def count_events(redis_url: str, prefix: str) -> int:
    async def read() -> int:
        store = RedisStore(redis_url, prefix=prefix)
        try:
            return len(await store.events("default", "bench-consumer"))
        finally:
            await store.close()

    return asyncio.run(read())


def calls_summary(exchanges: Sequence[Exchange], phase: str) -> str:
    runs = [e.access if phase == "access" else e.log for e in exchanges]
    calls = statistics.fmean(len(r.calls) for r in runs if r is not None)
    rpcs = statistics.fmean(r.rpcs for r in runs if r is not None)
    methods = ", ".join(runs[0].methods) if runs and runs[0] is not None else ""
    return f"{calls:.0f} PDK calls, {rpcs:.0f} RPCs: {methods or '-'}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument(
        "--redis-url", default=os.environ.get("AFORO_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    args = parser.parse_args()
    count = args.requests
    prefix = f"bench:{uuid.uuid4().hex[:12]}:"
    log_dir = tempfile.mkdtemp(prefix="kong-bench-")
    sidecar = Sidecar(log_dir, {"AFORO_REDIS_URL": args.redis_url, "AFORO_KEY_PREFIX": prefix}).start()
    server = PluginServer()
    direct_to = direct_clients(sidecar)
    try:
        admin = sidecar.admin()
        admin.plan("bench", {"day": 10_000_000})
        admin.consumer("bench-consumer", "bench")
        consumer = {"id": "bench-consumer", "username": "bench"}

        def request(i: int) -> KongRequest:
            return KongRequest(consumer=consumer, headers={"user-agent": "bench", "accept": "*/*"})

        started = time.perf_counter()
        lean_config = {
            "timeout_ms": 50,
            "product": "catalog",
            "rate_limit_headers": False,
            "balance_header": False,
            "usage": False,
        }
        (default, lean, lean_http, lean_port), direct = run(
            server,
            [
                sidecar_config(sidecar, timeout_ms=50, usage_flush_interval_ms=200),
                sidecar_config(sidecar, **lean_config),
                # The same over HTTP/1.1 keep-alive: the main port, then the decision port.
                sidecar_config(sidecar, **lean_config, protocol="http"),
                sidecar_config(sidecar, **lean_config, protocol="http", decision_url=sidecar.decision_url),
            ],
            direct_to,
            count,
            request,
        )
        elapsed = time.perf_counter() - started
        assert server.stop() == 0
        stats = server.final_stats()
        events = count_events(args.redis_url, prefix)
        # A decision the sidecar made carries its window headers; a fail-open pass does not.
        degraded = sum(1 for e in default if e.header("X-RateLimit-Remaining-Day") is None)
        proxied = sum(e.proxied for e in default + lean + lean_http + lean_port)
    finally:
        for client in direct_to.values():
            client.close()
        server.cleanup()
        sidecar.stop()
        delete_prefix(args.redis_url, prefix)
        shutil.rmtree(log_dir, ignore_errors=True)

    access = [e.access.seconds for e in default]
    log = [e.log.seconds for e in default if e.log is not None]
    print(f"4 x {count} requests through the emulator, 3 x {count} direct: {elapsed:.1f}s (one at a time)")
    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    print()
    print("| phase (µs) | p50 | p90 | p99 | mean | PDK round trips per request |")
    print("|---|---|---|---|---|---|")
    print(row("access, default config", access, calls_summary(default, "access")))
    print(row("log, default config (off the request path)", log, calls_summary(default, "log")))
    print(
        row(
            "access, product set, no headers, usage off",
            [e.access.seconds for e in lean],
            calls_summary(lean, "access"),
        )
    )
    print(row("log, usage off", [e.log.seconds for e in lean if e.log], calls_summary(lean, "log")))
    for name, exchanges in (("main port", lean_http), ("decision port", lean_port)):
        print(
            row(
                f"access, as above, over HTTP/1.1 keep-alive ({name})",
                [e.access.seconds for e in exchanges],
                calls_summary(exchanges, "access"),
            )
        )
    for name, samples in direct.items():
        print(row(f"the sidecar's answer alone, {name} (the plugin's client, no Kong)", samples, "-"))
    print()
    print("added by the plugin in access beyond the sidecar's own answer on the same transport (p50):")
    for label, exchanges, transport in (
        ("default config, gRPC", default, "grpc"),
        ("lean, gRPC", lean, "grpc"),
        ("lean, HTTP main port", lean_http, "http"),
        ("lean, HTTP decision port", lean_port, "decision port"),
    ):
        access_p50 = percentiles([e.access.seconds for e in exchanges])["p50"]
        added = access_p50 - percentiles(direct[transport])["p50"]
        print(f"  {label}: {added:.0f} µs")
    print(f"usage: {events} events stored for {count + WARM_UP} proxied requests (with warm-up); {stats}")
    print(f"decisions: {proxied}/{4 * count} proxied, {degraded} past the 50 ms budget (fail-open passes)")
    # A fail-open pass (the 50 ms budget exceeded on a busy machine) is a figure, not a
    # failure; a lost or dropped usage event is.
    ok = events == count + WARM_UP and stats["dropped"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
