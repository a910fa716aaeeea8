#!/usr/bin/env python3
"""The sidecar against the naive baseline, in one run, on one machine.

Runs, under the same load (wrk, fixed connections, the seed request body of
../shared/bench/naive_baseline.py), in alternation for several rounds, and shows the
median run of each:

  naive      ../shared/bench/naive_baseline.py under uvicorn (one process)
  sidecar    `aforo-sidecar serve`, one process, on its decision port
  sidecar x2 the same with --workers 2
  sidecar, cluster 3+3 / 3+0   one process on a 3-master Redis Cluster with a replica
             per master, and without replicas, both started here from redis-server
             (or one cluster given with --cluster-url)
  and, over gRPC with one Python client process: a bare grpc.aio echo server (the
  ceiling of grpc.aio here), unary Authorize, and AuthorizeBatch (100 per call)

and prints decisions/s, P50/P95/P99, errors and the CPU time spent per decision by the
server (its worker processes included) and by Redis (masters, and replicas apart; read
from /proc for the servers on this machine), and the decisions per read of the Redis
masters (how many pipelined commands each socket read takes in: INFO stats
total_reads_processed), side by side, with ratios. While the
two-worker run is under load, a 1000/day consumer is hammered with 1500 requests and
must get exactly 1000 allows.

    python loadtests/benchmark.py [--duration 10] [--rounds 3] [--connections 32 256]
                                  [--cluster-url redis+cluster://...]

Needs wrk (Debian: apt-get install wrk), a Redis (AFORO_REDIS_URL, default
redis://127.0.0.1:6379/0; keys under a bench prefix are deleted afterwards) and the
package installed. Not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import httpx
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the test servers: a cluster started from redis-server
from tests.redis_servers import RedisClusterServers, delete_prefix, running  # noqa: E402

NAIVE = ROOT.parent / "shared" / "bench" / "naive_baseline.py"
REDIS_URL = os.environ.get("AFORO_REDIS_URL", "redis://127.0.0.1:6379/0")
TOKEN = "benchmark-admin-token-0001"
SEED_PATH = "/integrations/apigee/authorize"
WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local n = 0
request = function()
  n = n + 1
  return wrk.format(nil, nil, nil, '{"appId":"app-' .. (n % 1000) .. '","apiProduct":"premium-api",'
    .. '"operation":"POST /payments","estimatedCost":0.05}')
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %d %d %d %d %d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(95), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, e.status, 0, 0))
end
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=0.5)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


@contextmanager
def process(command: list[str], env: dict[str, str], ready_url: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_http(ready_url)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def wrk(url: str, connections: int, duration: int, script: str) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "-s", script, url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    line = next(x for x in out.splitlines() if x.startswith("RESULT"))
    requests, duration_us, p50, p95, p99, socket_errors, status_errors, _, _ = map(int, line.split()[1:])
    return {
        "rps": requests / (duration_us / 1e6),
        "p50_ms": p50 / 1000,
        "p95_ms": p95 / 1000,
        "p99_ms": p99 / 1000,
        "errors": socket_errors + status_errors,
    }


class Deployment(NamedTuple):
    """A Redis deployment measured: its URL and, when it runs on this machine, the
    PIDs of its masters and replicas and the ports of its masters."""

    url: str
    master_pids: list[int]
    replica_pids: list[int]
    master_ports: list[int]


class Target(NamedTuple):
    url: str
    main_url: str | None  # the sidecar's HTTP port (None: the baseline)
    pid: int  # the server's process (its workers are its children)
    redis: Deployment


def reads(ports: list[int]) -> int:
    """Reads from client sockets the Redis masters on ``ports`` made so far (each read
    takes in one batch of pipelined commands)."""
    return sum(int(redis.Redis(port=port).info("stats")["total_reads_processed"]) for port in ports)


def with_children(pid: int) -> list[int]:
    """``pid`` and every process below it (a server's worker processes)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += parents.get(current, [])
    return found


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of processes on this machine, from /proc."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def standalone() -> Deployment:
    """The Redis at REDIS_URL (its PID and port when it runs on this machine)."""
    client = redis.Redis.from_url(REDIS_URL)
    info = client.info("server")
    pid = int(info["process_id"])
    here = Path(f"/proc/{pid}").exists()
    return Deployment(REDIS_URL, [pid] if here else [], [], [int(info["tcp_port"])] if here else [])


def degraded(main_url: str) -> float:
    """Decisions the sidecar answered by its fail mode so far (they must stay 0: a
    degraded allow is fast because it skips Redis, and is not counted)."""
    for line in httpx.get(f"{main_url}/metrics", timeout=10).text.splitlines():
        if line.startswith("aforo_degraded_decisions_total "):
            return float(line.split()[1])
    return 0.0


def seed(admin_url: str) -> None:
    """1000 apps like the baseline's (huge limits and balance), and a 1000/day app."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=admin_url, headers=headers, timeout=30) as http:
        plan = {"windows": {"minute": 10**9, "day": 10**12}, "price": 50_000}
        http.put("/v1/admin/plans/bench", json=plan).raise_for_status()
        http.put("/v1/admin/plans/daily", json={"windows": {"day": 1000}}).raise_for_status()
        http.put("/v1/admin/consumers/exact-1000", json={"plan_id": "daily"}).raise_for_status()
        for i in range(1000):
            http.put(f"/v1/admin/consumers/app-{i}", json={"plan_id": "bench"}).raise_for_status()
            http.post(f"/v1/admin/consumers/app-{i}/topup", json={"amount": 10**15}).raise_for_status()


async def exactness(decision_url: str) -> Counter[str]:
    """1500 requests from 64 clients at the 1000/day consumer: counts by reason."""
    body = {"consumer_id": "exact-1000", "product": "premium-api"}
    remaining = iter(range(1500))
    statuses: Counter[str] = Counter()
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=64)) as http:

        async def client() -> None:
            for _ in remaining:
                response = await http.post(f"{decision_url}/v1/authorize", json=body)
                statuses[response.json()["reason"]] += 1

        await asyncio.gather(*(client() for _ in range(64)))
    return statuses


def sidecar_env(prefix: str, redis_url: str = REDIS_URL, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AFORO_")}
    env.update(
        {
            # Measure decisions, not fail-mode answers: on a saturated box a 50 ms
            # deadline sheds load (the `degraded` column counts what it still sheds).
            "AFORO_DECISION_TIMEOUT_MS": "1000",
            "AFORO_REDIS_URL": redis_url,
            "AFORO_KEY_PREFIX": prefix,
            "AFORO_ADMIN_TOKEN": TOKEN,
            "AFORO_LOG_LEVEL": "warning",
            **extra,
        }
    )
    return env


def median_run(runs: list[dict[str, float]]) -> dict[str, float]:
    """The run with the median decisions/s (its latencies with it)."""
    return sorted(runs, key=lambda r: r["rps"])[len(runs) // 2]


@contextmanager
def sidecar(workers: int, grpc: bool = False, redis_url: str = REDIS_URL) -> Iterator[dict[str, str]]:
    """A seeded `aforo-sidecar serve` with its own key prefix, deleted afterwards;
    yields its URLs ("main", "decision") and gRPC target ("grpc")."""
    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    main_port, decision_port, grpc_port = free_port(), free_port(), free_port()
    env = sidecar_env(
        prefix,
        redis_url,
        AFORO_GRPC_PORT=str(grpc_port) if grpc else "0",
        AFORO_DECISION_PORT="0" if grpc else str(decision_port),
    )
    command = [
        sys.executable,
        "-m",
        "sidecar.cli",
        "serve",
        "--port",
        str(main_port),
        "--workers",
        str(workers),
    ]
    urls = {
        "main": f"http://127.0.0.1:{main_port}",
        "decision": f"http://127.0.0.1:{decision_port}",
        "grpc": f"127.0.0.1:{grpc_port}",
    }
    try:
        with process(command, env, f"{urls['main']}/healthz") as proc:
            urls["pid"] = str(proc.pid)
            if not grpc:
                wait_http(f"{urls['decision']}/healthz")
            seed(urls["main"])
            yield urls
    finally:
        delete_prefix(redis_url, prefix)


def run_http(
    args: argparse.Namespace, script: str, clusters: dict[str, Deployment]
) -> tuple[dict[str, dict[int, dict[str, float]]], Counter[int]]:
    """Every server up at once, measured in alternation round after round, so a drift
    of the machine's speed (a shared VM) weighs on each of them alike."""
    port = free_port()
    naive_env = {**os.environ, "REDIS_URL": REDIS_URL}
    naive = [sys.executable, "-m", "uvicorn", "naive_baseline:app", "--app-dir", str(NAIVE.parent),
             "--port", str(port), "--log-level", "warning", "--no-access-log"]  # fmt: skip
    one_redis = standalone()
    with contextlib.ExitStack() as stack:
        stack.enter_context(_deleting("naive:"))  # the baseline's own keys (seeded at each start)
        baseline = stack.enter_context(process(naive, naive_env, f"http://127.0.0.1:{port}/"))
        one = stack.enter_context(sidecar(1))
        two = stack.enter_context(sidecar(2))
        targets = {
            "naive": Target(f"http://127.0.0.1:{port}{SEED_PATH}", None, baseline.pid, one_redis),
            "sidecar": Target(f"{one['decision']}{SEED_PATH}", one["main"], int(one["pid"]), one_redis),
            "sidecar x2": Target(f"{two['decision']}{SEED_PATH}", two["main"], int(two["pid"]), one_redis),
        }
        for name, deployment in clusters.items():
            urls = stack.enter_context(sidecar(1, redis_url=deployment.url))
            targets[f"sidecar, {name}"] = Target(
                f"{urls['decision']}{SEED_PATH}", urls["main"], int(urls["pid"]), deployment
            )
        runs: dict[str, dict[int, list[dict[str, float]]]] = {name: {} for name in targets}
        for connections in args.connections:
            for _ in range(args.rounds):
                for name, target in targets.items():
                    before = degraded(target.main_url) if target.main_url else 0.0
                    server = with_children(target.pid)
                    groups = (server, target.redis.master_pids, target.redis.replica_pids)
                    cpu = [cpu_seconds(pids) for pids in groups]
                    read_before = reads(target.redis.master_ports)
                    result = wrk(target.url, connections, args.duration, script)
                    decisions = max(1.0, result["rps"] * args.duration)  # the baseline fails at 256
                    batches = reads(target.redis.master_ports) - read_before
                    result["per_read"] = decisions / batches if batches else 0.0
                    spent = [
                        (cpu_seconds(pids) - start) / decisions * 1e6
                        for pids, start in zip(groups, cpu, strict=True)
                    ]
                    result["server_us"], result["redis_us"], result["replicas_us"] = spent
                    result["degraded"] = degraded(target.main_url) - before if target.main_url else 0.0
                    runs[name].setdefault(connections, []).append(result)
        # Exactness under load: a 1000/day consumer hammered while wrk runs (a run of
        # its own: the checker's CPU would skew the figures).
        checker = Exactness(two["decision"])
        checker.start()
        wrk(targets["sidecar x2"].url, args.connections[0], args.duration, script)
        checker.join()
    results = {name: {c: median_run(r) for c, r in by_c.items()} for name, by_c in runs.items()}
    return results, checker.result


class Exactness(threading.Thread):
    """Runs ``exactness`` in its own thread and event loop, a second into the load."""

    def __init__(self, decision_url: str) -> None:
        super().__init__()
        self.decision_url = decision_url
        self.result: Counter[str] = Counter()

    def run(self) -> None:
        time.sleep(1)
        self.result = asyncio.run(exactness(self.decision_url))


@contextmanager
def _deleting(prefix: str) -> Iterator[None]:
    try:
        yield
    finally:
        delete_prefix(REDIS_URL, prefix)


@contextmanager
def _clusters(args: argparse.Namespace) -> Iterator[dict[str, Deployment]]:
    """The clusters to measure: --cluster-url, or two started here from redis-server, 3
    masters with a replica each ("cluster 3+3") and without ("cluster 3+0"), stopped
    afterwards."""
    if args.cluster_url:
        yield {"cluster": Deployment(args.cluster_url, [], [], [])}
        return
    with contextlib.ExitStack() as stack:
        found = {}
        for replicas in (1, 0):
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="aforo-bench-cluster-"))
            servers = stack.enter_context(running(RedisClusterServers(folder, replicas=replicas)))
            masters = {s.port for s in servers.masters()}
            found[f"cluster 3+{3 * replicas}"] = Deployment(
                servers.url,
                [s.proc.pid for s in servers.servers if s.port in masters and s.proc],
                [s.proc.pid for s in servers.servers if s.port not in masters and s.proc],
                sorted(masters),
            )
        yield found


def run_grpc(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """The gRPC figures, measured by loadtests/grpc_load.py in its own process, echo
    and sidecar in alternation round after round (see run_http)."""
    echo_port = free_port()
    load = [sys.executable, str(ROOT / "loadtests" / "grpc_load.py"), "--duration", str(args.duration),
            "--concurrency", str(args.connections[0])]  # fmt: skip
    echo_server = subprocess.Popen(
        [sys.executable, str(ROOT / "loadtests" / "grpc_load.py"), "--serve-echo", str(echo_port)],
        stdout=subprocess.PIPE,
    )
    try:
        assert echo_server.stdout is not None
        echo_server.stdout.readline()  # "ready"
        with sidecar(1, grpc=True) as urls:
            modes = {
                "grpc echo (bare grpc.aio)": (f"127.0.0.1:{echo_port}", "echo"),
                "grpc Authorize": (urls["grpc"], "unary"),
                "grpc AuthorizeBatch x100": (urls["grpc"], "batch"),
            }
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in modes}
            for _ in range(args.rounds):
                for name, (target, mode) in modes.items():
                    out = subprocess.run(
                        [*load, "--target", target, "--mode", mode],
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                    runs[name].append(json.loads(out.stdout))
    finally:
        echo_server.terminate()
        echo_server.wait()
    return {name: median_run(r) for name, r in runs.items()}


def _ratio(rps: float, naive_rps: float) -> str:
    # The baseline fails outright at high concurrency (its Redis pool of 64 runs dry).
    return f"{rps / naive_rps:.2f}" if naive_rps >= 1 else "n/a"


def _row(name: str, connections: int, r: dict[str, float], ratio: str) -> str:
    cells = [
        f"{connections}",
        f"{r['rps']:,.0f}",
        ratio,
        f"{r['p50_ms']:.2f}",
        f"{r['p95_ms']:.2f}",
        f"{r['p99_ms']:.2f}",
        f"{r['errors']:.0f}",
        f"{r.get('degraded', 0):.0f}",
    ]
    if "redis_us" in r and r["rps"]:  # gRPC runs have no CPU figures, a failed run none
        cells += [
            f"{r['server_us']:.0f}",
            f"{r['redis_us']:.1f}" if r["redis_us"] else "n/a",
            f"{r['replicas_us']:.1f}",
            f"{r['per_read']:.1f}" if r["per_read"] else "n/a",
        ]
    return f"{name:<28} " + " ".join(f"{c:>11}" for c in cells)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--rounds", type=int, default=3, help="runs of each server; the median is shown")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--cluster-url", help="a Redis Cluster to measure (default: start two here)")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed (Debian: apt-get install wrk)", file=sys.stderr)
        return 2
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT)
    with _clusters(args) as clusters:
        http, exact = run_http(args, script.name, clusters)
    grpc_results = run_grpc(args)
    if args.json:
        args.json.write_text(
            json.dumps({"http": http, "grpc": grpc_results, "exactness": dict(exact)}, indent=2)
        )
    print(
        f"\nmachine: {os.cpu_count()} cores; wrk -t1, {args.duration}s per run, median of {args.rounds} "
        f"rounds run in alternation; Redis {REDIS_URL}\n"
    )
    columns = ("conns", "decisions/s", "x naive", "p50 ms", "p95 ms", "p99 ms", "errors", "degraded",
               "server us/d", "redis us/d", "replica us/d", "cmds/read")  # fmt: skip
    print(f"{'run':<28} " + " ".join(f"{c:>11}" for c in columns))
    for name, by_connections in http.items():
        for connections, r in by_connections.items():
            print(_row(name, connections, r, _ratio(r["rps"], http["naive"][connections]["rps"])))
    echo = grpc_results["grpc echo (bare grpc.aio)"]["rps"]
    naive32 = http["naive"][args.connections[0]]["rps"]
    for name, r in grpc_results.items():
        print(
            _row(name, args.connections[0], r, _ratio(r["rps"], naive32))
            + f"   ({r['rps'] / echo:.0%} of echo)"
        )
    for c in args.connections:
        scaling = http["sidecar x2"][c]["rps"] / http["sidecar"][c]["rps"]
        print(f"workers scaling at {c} connections: x{scaling:.2f}")
    for name in (n for n in http if n.startswith("sidecar, cluster")):
        for c in args.connections:
            kept = http[name][c]["rps"] / http["sidecar"][c]["rps"]
            cluster = name.removeprefix("sidecar, ")
            print(f"{cluster} against one Redis at {c} connections (one process each): {kept:.0%}")
    verdict = "PASS" if exact == Counter({"ok": 1000, "quota_exceeded": 500}) else "FAIL"
    print(f"exactness under load (1000/day, 1500 requests, 64 clients, 2 workers): {dict(exact)} {verdict}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
