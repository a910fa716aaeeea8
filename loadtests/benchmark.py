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

and prints decisions/s, P50/P95/P99 and the longest, errors, the CPU time spent per decision by the
server (its worker processes included) and by Redis (masters, and replicas apart; read
from /proc for the servers on this machine), and the decisions per read of the Redis
masters (how many pipelined commands each socket read takes in: INFO stats
total_reads_processed), side by side, with ratios. While the
two-worker run is under load, a 1000/day consumer is hammered with 1500 requests and
must get exactly 1000 allows. Each server's memory (RSS) is printed as it was before its
first run and after its last.

Then what a decision costs by workload (one process, the first connection count, POST
/v1/authorize): ``allowed`` (the seed body), ``denied`` (a flood at a suspended consumer
and at one whose window is exhausted) and ``mix`` (the Locust mix's shares): decisions/s
and its ratio to the allowed rate, latencies, CPU per decision of the sidecar and of
Redis, and from INFO commandstats deltas the time Redis spent in the decision scripts,
the scripts and the commands it ran per decision (a decision answered from memory runs
none).

    python loadtests/benchmark.py [--duration 10] [--rounds 3] [--connections 32 256]
                                  [--cluster-url redis+cluster://...]
                                  [--workloads allowed denied mix]

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
_WRK_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %d %d %d %d %d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(95), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, e.status, latency.max, 0))
end
"""
# For workloads whose answers are denials (4xx, which wrk counts as errors): the status
# errors reported are the 5xx alone, counted in the (one) thread and read back in done.
_WRK_DENIALS_DONE = """
local threads = {}
setup = function(thread) table.insert(threads, thread) end
init = function() failed = 0 end
response = function(status) if status >= 500 then failed = failed + 1 end end
done = function(summary, latency, requests)
  local e = summary.errors
  local failed = 0
  for _, thread in ipairs(threads) do failed = failed + thread:get("failed") end
  io.write(string.format("RESULT %d %d %d %d %d %d %d %d %d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(95), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, failed, latency.max, 0))
end
"""
_WRK_HEAD = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local n = 0
"""
# The seed's request body of the baseline: app-0..999, each allowed.
WRK_SCRIPT = (
    _WRK_HEAD
    + """
request = function()
  n = n + 1
  return wrk.format(nil, nil, nil, '{"appId":"app-' .. (n % 1000) .. '","apiProduct":"premium-api",'
    .. '"operation":"POST /payments","estimatedCost":0.05}')
end
"""
    + _WRK_DONE
)
# Workloads of the cost runs (POST /v1/authorize on the decision port).
_DECIDE = """
local function ask(consumer)
  return wrk.format(nil, "/v1/authorize", nil, '{"consumer_id":"' .. consumer .. '","product":"premium-api"}')
end
"""
WORKLOADS = {
    "allowed": WRK_SCRIPT,
    # A denial flood: a suspended consumer and one whose window is exhausted.
    "denied": _WRK_HEAD
    + _DECIDE
    + """
request = function()
  n = n + 1
  if n % 2 == 0 then return ask("deny-suspended") end
  return ask("deny-exhausted")
end
"""
    + _WRK_DENIALS_DONE,
    # The Locust mix's shares: 5% unknown, 66% roomy plans, 14% a 5/minute plan, 10% no
    # money, 5% suspended.
    "mix": _WRK_HEAD
    + _DECIDE
    + """
request = function()
  n = n + 1
  local k = n % 100
  if k < 5 then return ask("ghost-" .. n) end
  if k < 71 then return ask("app-" .. (n % 1000)) end
  if k < 85 then return ask("mix-free-" .. (n % 15)) end
  if k < 95 then return ask("mix-broke-" .. (n % 10)) end
  return ask("mix-banned-" .. (n % 5))
end
"""
    + _WRK_DENIALS_DONE,
}


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
    fields = map(int, line.split()[1:])
    requests, duration_us, p50, p95, p99, socket_errors, status_errors, longest, _ = fields
    return {
        "rps": requests / (duration_us / 1e6),
        "p50_ms": p50 / 1000,
        "p95_ms": p95 / 1000,
        "p99_ms": p99 / 1000,
        "max_ms": longest / 1000,
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
    script: str | None = None  # a wrk script of its own (default: the run's)


def reads(ports: list[int]) -> int:
    """Reads from client sockets the Redis masters on ``ports`` made so far (each read
    takes in one batch of pipelined commands)."""
    return sum(int(redis.Redis(port=port).info("stats")["total_reads_processed"]) for port in ports)


def commandstats(ports: list[int]) -> dict[str, int]:
    """What the Redis masters on ``ports`` ran so far (INFO commandstats): ``commands``
    (every command, those a script calls included), ``scripts`` (EVALSHA/EVAL calls) and
    ``script_usec`` (their time, what the scripts call included)."""
    totals = {"commands": 0, "scripts": 0, "script_usec": 0}
    for port in ports:
        for name, stats in redis.Redis(port=port).info("commandstats").items():
            if name in _NOT_DECISIONS:
                continue
            totals["commands"] += int(stats["calls"])
            # Each command's own time too: inside a script it is counted apart as well,
            # which profiles decide.lua command by command.
            command = name.removeprefix("cmdstat_")
            totals[f"usec:{command}"] = totals.get(f"usec:{command}", 0) + int(stats["usec"])
            totals[f"calls:{command}"] = totals.get(f"calls:{command}", 0) + int(stats["calls"])
            if name in ("cmdstat_evalsha", "cmdstat_eval"):
                totals["scripts"] += int(stats["calls"])
                totals["script_usec"] += int(stats["usec"])
    return totals


# The benchmark's own reads, not the sidecar's work.
_NOT_DECISIONS = frozenset({"cmdstat_info", "cmdstat_ping", "cmdstat_client|setinfo", "cmdstat_hello"})


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


def rss_mb(pids: list[int]) -> float:
    """Resident memory of processes on this machine (VmRSS), in MB."""
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        rss = [int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")]
        total += rss[0] if rss else 0
    return total / 1024


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
        # The cost runs' denials and mix (WORKLOADS).
        http.put("/v1/admin/plans/zero", json={"windows": {"day": 0}}).raise_for_status()
        http.put("/v1/admin/plans/free", json={"windows": {"minute": 5, "day": 100}}).raise_for_status()
        population = [("deny-suspended", "bench", True), ("deny-exhausted", "zero", False)]
        population += [(f"mix-free-{i}", "free", False) for i in range(15)]
        population += [(f"mix-broke-{i}", "bench", False) for i in range(10)]
        population += [(f"mix-banned-{i}", "bench", True) for i in range(5)]
        for consumer, plan, suspended in population:
            http.put(f"/v1/admin/consumers/{consumer}", json={"plan_id": plan}).raise_for_status()
            if suspended:
                http.post(f"/v1/admin/consumers/{consumer}/suspend", json={}).raise_for_status()


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


@contextmanager
def _lua(script: str) -> Iterator[str]:
    """``script`` in a file for wrk (its path), removed afterwards."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as lua:
        lua.write(script)
        lua.flush()
        yield lua.name


def median_run(runs: list[dict[str, float]]) -> dict[str, float]:
    """The run with the median decisions/s (its latencies with it)."""
    return sorted(runs, key=lambda r: r["rps"])[len(runs) // 2]


@contextmanager
def sidecar(
    workers: int, grpc: bool = False, redis_url: str = REDIS_URL, gateway_token: bool = False
) -> Iterator[dict[str, str]]:
    """A seeded `aforo-sidecar serve` with its own key prefix, deleted afterwards;
    yields its URLs ("main", "decision") and gRPC target ("grpc"); with
    ``gateway_token`` it requires one, minted at start ("token")."""
    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    main_port, decision_port, grpc_port = free_port(), free_port(), free_port()
    env = sidecar_env(
        prefix,
        redis_url,
        AFORO_GRPC_PORT=str(grpc_port) if grpc else "0",
        AFORO_DECISION_PORT="0" if grpc else str(decision_port),
        AFORO_REQUIRE_GATEWAY_TOKEN="true" if gateway_token else "false",
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
            if gateway_token:
                minted = httpx.post(
                    f"{urls['main']}/v1/admin/tokens",
                    json={"role": "gateway", "name": "benchmark"},
                    headers={"Authorization": f"Bearer {TOKEN}"},
                )
                minted.raise_for_status()
                urls["token"] = minted.json()["token"]
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
        guarded = stack.enter_context(sidecar(1, gateway_token=True))
        with_token = stack.enter_context(
            _lua(f'wrk.headers["Authorization"] = "Bearer {guarded["token"]}"\n' + WRK_SCRIPT)
        )
        targets = {
            "naive": Target(f"http://127.0.0.1:{port}{SEED_PATH}", None, baseline.pid, one_redis),
            "sidecar": Target(f"{one['decision']}{SEED_PATH}", one["main"], int(one["pid"]), one_redis),
            "sidecar, gateway token": Target(
                f"{guarded['decision']}{SEED_PATH}",
                guarded["main"],
                int(guarded["pid"]),
                one_redis,
                with_token,
            ),
            "sidecar x2": Target(f"{two['decision']}{SEED_PATH}", two["main"], int(two["pid"]), one_redis),
        }
        for name, deployment in clusters.items():
            urls = stack.enter_context(sidecar(1, redis_url=deployment.url))
            targets[f"sidecar, {name}"] = Target(
                f"{urls['decision']}{SEED_PATH}", urls["main"], int(urls["pid"]), deployment
            )
        runs: dict[str, dict[int, list[dict[str, float]]]] = {name: {} for name in targets}
        # Memory of each server before its first run and after its last (it must stay flat).
        memory = {name: [rss_mb(with_children(t.pid))] for name, t in targets.items()}
        for connections in args.connections:
            for _ in range(args.rounds):
                for name, target in targets.items():
                    result = measure(target, target.url, connections, args.duration, target.script or script)
                    runs[name].setdefault(connections, []).append(result)
        for name, target in targets.items():
            memory[name].append(rss_mb(with_children(target.pid)))
        # What a decision costs by workload: one process, the first connection count.
        costs: dict[str, list[dict[str, float]]] = {}
        one_target = targets["sidecar"]
        scripts = {w: stack.enter_context(_lua(WORKLOADS[w])) for w in args.workloads}
        for _ in range(args.rounds):
            for workload, lua in scripts.items():
                url = one_target.url if workload == "allowed" else one["decision"]
                result = measure(one_target, url, args.connections[0], args.duration, lua)
                costs.setdefault(workload, []).append(result)
        # Exactness under load: a 1000/day consumer hammered while wrk runs (a run of
        # its own: the checker's CPU would skew the figures).
        checker = Exactness(two["decision"])
        checker.start()
        wrk(targets["sidecar x2"].url, args.connections[0], args.duration, script)
        checker.join()
    results = {name: {c: median_run(r) for c, r in by_c.items()} for name, by_c in runs.items()}
    for name, (first, last) in memory.items():
        for by_connections in results[name].values():
            by_connections["rss_start_mb"], by_connections["rss_end_mb"] = first, last
    return results, {w: median_run(r) for w, r in costs.items()}, checker.result


def measure(target: Target, url: str, connections: int, duration: int, script: str) -> dict[str, float]:
    """One wrk run against ``url`` (a server of ``target``) and what it cost: CPU time
    per decision of the server and of Redis (from /proc), Redis commands and script
    time per decision (INFO commandstats), decisions per Redis socket read."""
    before = degraded(target.main_url) if target.main_url else 0.0
    groups = (with_children(target.pid), target.redis.master_pids, target.redis.replica_pids)
    cpu = [cpu_seconds(pids) for pids in groups]
    read_before = reads(target.redis.master_ports)
    stats_before = commandstats(target.redis.master_ports)
    result = wrk(url, connections, duration, script)
    decisions = max(1.0, result["rps"] * duration)  # the baseline fails at 256
    batches = reads(target.redis.master_ports) - read_before
    result["per_read"] = decisions / batches if batches else 0.0
    spent = [(cpu_seconds(pids) - start) / decisions * 1e6 for pids, start in zip(groups, cpu, strict=True)]
    result["server_us"], result["redis_us"], result["replicas_us"] = spent
    stats = commandstats(target.redis.master_ports)
    for field in stats:
        per_decision = (stats[field] - stats_before.get(field, 0)) / decisions
        if field in ("commands", "scripts", "script_usec") or per_decision > 0:
            result[field if ":" in field else f"{field}_per_d"] = per_decision
    result["degraded"] = degraded(target.main_url) - before if target.main_url else 0.0
    result["rss_mb"] = rss_mb(groups[0])
    return result


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
        f"{r['max_ms']:.1f}" if "max_ms" in r else "",
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
    parser.add_argument(
        "--workloads",
        nargs="*",
        default=list(WORKLOADS),
        choices=list(WORKLOADS),
        help="cost runs of one process (none: skip them)",
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed (Debian: apt-get install wrk)", file=sys.stderr)
        return 2
    with _lua(WRK_SCRIPT) as script, _clusters(args) as clusters:
        http, costs, exact = run_http(args, script, clusters)
    grpc_results = run_grpc(args)
    if args.json:
        args.json.write_text(
            json.dumps(
                {"http": http, "costs": costs, "grpc": grpc_results, "exactness": dict(exact)}, indent=2
            )
        )
    print(
        f"\nmachine: {os.cpu_count()} cores; wrk -t1, {args.duration}s per run, median of {args.rounds} "
        f"rounds run in alternation; Redis {REDIS_URL}\n"
    )
    columns = ("conns", "decisions/s", "x naive", "p50 ms", "p95 ms", "p99 ms", "max ms", "errors",
               "degraded", "server us/d", "redis us/d", "replica us/d", "cmds/read")  # fmt: skip
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
    print(f"\ncost per decision by workload (one process, {args.connections[0]} connections):")
    columns = ("decisions/s", "x allowed", "p50 ms", "p99 ms", "errors", "server us/d", "redis us/d",
               "script us/d", "scripts/d", "cmds/d")  # fmt: skip
    print(f"{'workload':<28} " + " ".join(f"{c:>11}" for c in columns))
    allowed_rps = costs["allowed"]["rps"] if "allowed" in costs else 0.0
    for workload, r in costs.items():
        cells = [f"{r['rps']:,.0f}", _ratio(r["rps"], allowed_rps),
                 f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}", f"{r['errors']:.0f}", f"{r['server_us']:.0f}",
                 f"{r['redis_us']:.1f}", f"{r['script_usec_per_d']:.1f}", f"{r['scripts_per_d']:.2f}",
                 f"{r['commands_per_d']:.1f}"]  # fmt: skip
        print(f"{workload:<28} " + " ".join(f"{c:>11}" for c in cells))
    for workload, r in costs.items():
        # The decision script's time by the commands it runs (their own time; the rest of
        # the script's time is Lua and argument handling).
        inner = sorted(
            ((k.removeprefix("usec:"), v) for k, v in r.items() if k.startswith("usec:") and "eval" not in k),
            key=lambda item: -item[1],
        )
        shown = ", ".join(
            f"{name} {usec:.1f} ({r[f'calls:{name}']:.2f}x)" for name, usec in inner if usec >= 0.05
        )
        print(f"  {workload}: us per decision by command: {shown or 'none'}")
    for name, by_connections in http.items():
        r = next(iter(by_connections.values()))
        before, after = r["rss_start_mb"], r["rss_end_mb"]
        print(f"memory of {name}: {before:.0f} MB before its first run, {after:.0f} MB after its last")
    for c in args.connections:
        scaling = http["sidecar x2"][c]["rps"] / http["sidecar"][c]["rps"]
        print(f"workers scaling at {c} connections: x{scaling:.2f}")
    for c in args.connections:
        kept = http["sidecar, gateway token"][c]["rps"] / http["sidecar"][c]["rps"]
        print(f"gateway token required, against none at {c} connections (one process each): {kept:.0%}")
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
