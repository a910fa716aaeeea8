#!/usr/bin/env python3
"""gRPC load for the benchmark: N concurrent calls from one client process for a
fixed time; prints {"rps", "p50_ms", "p95_ms", "p99_ms", "errors"} as JSON.

    grpc_load.py --echo                        a bare grpc.aio echo server (the ceiling)
    grpc_load.py --serve-echo PORT             only serve the echo server
    grpc_load.py --target HOST:PORT --mode unary|batch|echo
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time

import grpc
import uvloop

from sidecar.grpc.gen.aforo.sidecar.v1 import sidecar_pb2 as pb
from sidecar.grpc.gen.aforo.sidecar.v1 import sidecar_pb2_grpc as pb_grpc

ECHO = "/bench.Echo/Echo"
BATCH = 100


async def serve_echo(port: int) -> None:
    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


async def load(target: str, mode: str, concurrency: int, duration: float) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    decisions = 0
    async with grpc.aio.insecure_channel(target) as channel:
        if mode == "echo":
            call = channel.unary_unary(ECHO)
            payload = pb.AuthorizeRequest(
                consumer_id="app-1", product="premium-api", cost=50_000
            ).SerializeToString()
        stub = pb_grpc.SidecarStub(channel)
        deadline = time.perf_counter() + duration

        async def worker(n: int) -> None:
            nonlocal errors, decisions
            i = n
            while time.perf_counter() < deadline:
                i += concurrency
                started = time.perf_counter()
                try:
                    if mode == "echo":
                        await call(payload, timeout=10)
                        decisions += 1
                    elif mode == "unary":
                        await stub.Authorize(
                            pb.AuthorizeRequest(
                                consumer_id=f"app-{i % 1000}", product="premium-api", cost=50_000
                            ),
                            timeout=10,
                        )
                        decisions += 1
                    else:
                        items = [
                            pb.AuthorizeRequest(
                                consumer_id=f"app-{(i + k) % 1000}", product="premium-api", cost=50_000
                            )
                            for k in range(BATCH)
                        ]
                        await stub.AuthorizeBatch(pb.AuthorizeBatchRequest(requests=items), timeout=10)
                        decisions += BATCH
                except grpc.aio.AioRpcError:
                    errors += 1
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker(n) for n in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(len(latencies) * p))] * 1000 if latencies else 0.0

    return {
        "rps": decisions / elapsed,
        "p50_ms": pct(0.5),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
        "errors": errors,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target")
    parser.add_argument("--mode", choices=["unary", "batch", "echo"], default="unary")
    parser.add_argument("--echo", action="store_true", help="start a bare echo server and load it")
    parser.add_argument("--serve-echo", type=int, metavar="PORT", help="serve the echo server")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=10)
    args = parser.parse_args()
    if args.serve_echo:
        uvloop.run(serve_echo(args.serve_echo))
        return 0
    if args.echo:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve-echo", str(port)], stdout=subprocess.PIPE
        )
        try:
            assert server.stdout is not None
            server.stdout.readline()
            result = uvloop.run(load(f"127.0.0.1:{port}", "echo", args.concurrency, args.duration))
        finally:
            server.terminate()
            server.wait()
    else:
        result = uvloop.run(load(args.target, args.mode, args.concurrency, args.duration))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
