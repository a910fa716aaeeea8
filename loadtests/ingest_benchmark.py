#!/usr/bin/env python3
"""Ingestion throughput: batched Kong HTTP Log payloads into one sidecar process,
then zero loss checked by counting rows in Postgres after the reconciler drains.

    python loadtests/ingest_benchmark.py [--events 200000] [--batch 500] [--clients 4]

Each event is a distinct request (its own Kong request id) built from the recorded
log in tests/fixtures/kong_http_log.json. Needs Redis (AFORO_REDIS_URL) and Postgres
(AFORO_TEST_DATABASE_URL, a role that may create databases); a scratch database and
a Redis key prefix are made for the run and removed afterwards. Not a test: it
prints figures.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import asyncpg
import httpx
import redis

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("AFORO_REDIS_URL", "redis://127.0.0.1:6379/0")
PG_URL = os.environ.get("AFORO_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
SECRET = "benchmark-ingest-secret-0001"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def batches(total: int, size: int, consumers: int) -> list[bytes]:
    template = json.loads((ROOT / "tests" / "fixtures" / "kong_http_log.json").read_text())[0]
    bodies = []
    for start in range(0, total, size):
        logs = []
        for i in range(start, min(total, start + size)):
            log = copy.deepcopy(template)
            log["request"]["id"] = f"req-{i:012d}"
            log["consumer"]["id"] = f"consumer-{i % consumers}"
            log["started_at"] += i
            logs.append(log)
        bodies.append(json.dumps(logs).encode())
    return bodies


async def post_all(url: str, bodies: list[bytes], clients: int) -> tuple[float, int, int]:
    queue = list(reversed(bodies))
    accepted = retried = 0
    headers = {"X-Aforo-Ingest-Secret": SECRET, "Content-Type": "application/json"}
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=clients)) as http:

        async def client() -> None:
            nonlocal accepted, retried
            while queue:
                body = queue.pop()
                while True:
                    response = await http.post(url, content=body, headers=headers)
                    if response.status_code == 202:
                        accepted += response.json()["accepted"]
                        break
                    retried += 1  # 503: back pressure; resend (deduplicated)
                    await asyncio.sleep(float(response.headers.get("retry-after", "1")))

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return time.perf_counter() - started, accepted, retried


async def admin(sql: str) -> None:
    conn = await asyncpg.connect(PG_URL)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


ADMIN_TOKEN = "ingest-benchmark-admin-token"
PRICE = 10_000  # micros a call: 0.01


def catalog(base_url: str, consumers: int) -> None:
    """A plan and the benchmark's consumers (postpaid: charged, never refused)."""
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with httpx.Client(base_url=base_url, headers=auth, timeout=30) as http:
        http.put(
            "/v1/admin/plans/metered", json={"windows": {"day": 10**9}, "price": PRICE}
        ).raise_for_status()
        for i in range(consumers):
            body = {"plan_id": "metered", "wallet_mode": "postpaid"}
            http.put(f"/v1/admin/consumers/consumer-{i}", json=body).raise_for_status()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--consumers", type=int, default=500)
    parser.add_argument(
        "--rated",
        action="store_true",
        help="create the consumers first (postpaid, 0.01 a call), so every event is counted and charged",
    )
    args = parser.parse_args()

    database = f"aforo_ingest_bench_{uuid.uuid4().hex[:8]}"
    database_url = PG_URL.rsplit("/", 1)[0] + "/" + database
    prefix = f"ingestbench:{uuid.uuid4().hex[:8]}:"
    asyncio.run(admin(f"CREATE DATABASE {database}"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AFORO_")}
    env.update(
        {
            "AFORO_REDIS_URL": REDIS_URL,
            "AFORO_KEY_PREFIX": prefix,
            "AFORO_DATABASE_URL": database_url,
            "AFORO_INGEST_SECRETS": f"default={SECRET}",
            "AFORO_GRPC_PORT": "0",
            "AFORO_DECISION_PORT": "0",
            "AFORO_LOG_LEVEL": "warning",
            "AFORO_ADMIN_TOKEN": ADMIN_TOKEN,
        }
    )
    cli = [sys.executable, "-m", "sidecar.cli"]
    sidecar = None
    try:
        subprocess.run([*cli, "migrate"], env=env, check=True, capture_output=True)
        sidecar = subprocess.Popen([*cli, "serve", "--port", str(port)], env=env)
        for _ in range(100):
            try:
                httpx.get(f"http://127.0.0.1:{port}/healthz")
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        if args.rated:
            catalog(f"http://127.0.0.1:{port}", args.consumers)
        bodies = batches(args.events, args.batch, args.consumers)
        url = f"http://127.0.0.1:{port}/integrations/kong/ingest"
        elapsed, accepted, retried = asyncio.run(post_all(url, bodies, args.clients))
        setup = (
            f"batches of {args.batch}, {args.clients} clients, one sidecar process, {retried} retried 503s"
        )
        print(f"ingested {accepted} events in {elapsed:.2f}s: {accepted / elapsed:,.0f} events/s ({setup})")
        started = time.perf_counter()
        drained = subprocess.run(
            [*cli, "reconcile", "--once"], env=env, check=False, capture_output=True, text=True
        )
        if drained.returncode != 0:
            print(f"reconcile --once failed ({drained.returncode}):\n{drained.stderr}", file=sys.stderr)
            return 1
        print(f"reconciler drained in {time.perf_counter() - started:.1f}s: {drained.stdout.strip()}")

        async def count() -> int:
            conn = await asyncpg.connect(database_url)
            try:
                return await conn.fetchval("SELECT count(*) FROM gateway_events")
            finally:
                await conn.close()

        rows = asyncio.run(count())
        verdict = "zero loss" if rows == args.events == accepted else "MISMATCH"
        print(f"postgres gateway_events rows: {rows} of {args.events} sent: {verdict}")
        if args.rated:

            async def charged() -> tuple[int, int, int]:
                conn = await asyncpg.connect(database_url)
                try:
                    usage = await conn.fetchrow(
                        "SELECT count(*) AS n, coalesce(sum(cost), 0)::bigint AS cost FROM usage_records"
                    )
                    balance = await conn.fetchval("SELECT coalesce(sum(balance), 0)::bigint FROM wallets")
                    return usage["n"], usage["cost"], balance
                finally:
                    await conn.close()

            records, cost, balance = asyncio.run(charged())
            exact = records == args.events and cost == -balance == args.events * PRICE
            verdict = verdict if exact else "MISMATCH"
            print(
                f"rated: {records} usage records, {cost} micros charged, wallets {balance}: "
                f"{'exact' if exact else 'MISMATCH'}"
            )
        return 0 if verdict == "zero loss" else 1
    finally:
        if sidecar is not None:
            sidecar.send_signal(signal.SIGTERM)
            sidecar.wait(timeout=15)
        asyncio.run(admin(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])


if __name__ == "__main__":
    sys.exit(main())
