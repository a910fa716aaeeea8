#!/usr/bin/env python3
"""Where a decision's Redis time goes: ``decide.lua`` and variants of its parts, each
run many times (pipelined) against the local Redis, timed by INFO commandstats (Redis's
own microseconds per EVALSHA, so neither the network nor this client counts).

    python loadtests/script_profile.py [--calls 50000] [--rounds 5]

Variants, from nothing to the whole script:
  empty            ``return 1``, no keys, no arguments: the fixed cost of a script call
  empty+args       ``return 1`` with the decision's 9 keys and 17 arguments
  empty+reply      returning the decision's 17-element reply
  hmget            the consumer hash read (15 fields)
  hmget+2 get      and the two window counters (GET each)
  reads+writes     and the writes of an allowed call: 2 INCRBY, HINCRBY, XADD
  hmget 5 fields   alternatives, each with the arguments and the reply: a consumer read
  counts           of 5 fields; the counter and wallet writes alone; the XADD of 9 field
  xadd 9 pairs     pairs alone, and of one packed field
  xadd 1 packed
  decide.lua       the real script, an allowed call (as a consumer named by id)

Not a test: it prints figures. Keys live under a prefix of their own, deleted after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from sidecar.store.redis_store import Script  # noqa: E402
from tests.redis_servers import delete_prefix  # noqa: E402

REDIS_URL = os.environ.get("AFORO_REDIS_URL", "redis://127.0.0.1:6379/0")
FIELDS = [
    "status",
    "products",
    "price",
    "wallet",
    "base",
    "spent",
    "settled",
    "l_minute",
    "l_hour",
    "l_day",
    "l_week",
    "l_month",
    "hold",
    "saz",
    "at_thr",
]
REPLY = "return {0, 'ok', 50000, 100, 'did', 0, 1, 2, -1, -1, -1, 10, 20, -1, -1, -1, 0}"
HMGET = f"local c = redis.call('HMGET', KEYS[1], {', '.join(repr(f) for f in FIELDS)})"
HMGET_5 = "local c = redis.call('HMGET', KEYS[1], 'status', 'base', 'spent', 'settled', 'hold')"
GETS = "local a = redis.call('GET', KEYS[4]) local b = redis.call('GET', KEYS[5])"
COUNTS = (
    "redis.call('INCRBY', KEYS[4], 1) redis.call('INCRBY', KEYS[5], 1) "
    "redis.call('HINCRBY', KEYS[1], 'spent', 50000)"
)
XADD = (
    "redis.call('XADD', KEYS[2], 'MAXLEN', '~', 1000, '*', 'rid', ARGV[9], 'did', ARGV[10], 'ts', ARGV[8], "
    "'t', ARGV[6], 'c', ARGV[7], 'p', ARGV[11], 'op', ARGV[12], 'cost', '50000', 'hits', ARGV[14])"
)
XADD_PACKED = (
    "redis.call('XADD', KEYS[2], 'MAXLEN', '~', 1000, '*', 'd', ARGV[9] .. '|' .. ARGV[10] .. '|' .. ARGV[8]"
    " .. '|' .. ARGV[11] .. '|' .. ARGV[12] .. '|50000|' .. ARGV[14])"
)
VARIANTS = {
    "empty": ("return 1", False),
    "empty+args": ("return 1", True),
    "empty+reply": (REPLY, True),
    "hmget": (f"{HMGET} {REPLY}", True),
    "hmget+2 get": (f"{HMGET} {GETS} {REPLY}", True),
    "reads+writes": (f"{HMGET} {GETS} {COUNTS} {XADD} {REPLY}", True),
    # Parts weighed against alternatives (each with the arguments and the reply).
    "hmget 5 fields": (f"{HMGET_5} {REPLY}", True),
    "counts": (f"{COUNTS} {REPLY}", True),
    "xadd 9 pairs": (f"{XADD} {REPLY}", True),
    "xadd 1 packed": (f"{XADD_PACKED} {REPLY}", True),
}


def usec_per_call(client: redis.Redis, run: Callable[[Any, int], None], calls: int) -> float:
    """Redis's microseconds per EVALSHA over ``calls`` calls of ``run``."""
    before = client.info("commandstats").get("cmdstat_evalsha", {"usec": 0, "calls": 0})
    batch = 1000
    for start in range(0, calls, batch):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(calls, start + batch)):
            run(pipe, i)
        pipe.execute()
    after = client.info("commandstats")["cmdstat_evalsha"]
    return (after["usec"] - before["usec"]) / (after["calls"] - before["calls"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    client = redis.Redis.from_url(REDIS_URL)
    prefix = f"profile:{uuid.uuid4().hex[:8]}:"
    tag = f"{prefix}{{t:c}}"
    keys = [f"{tag}:h", f"{tag}:u", f"{tag}:n", f"{tag}:w:m", f"{tag}:w:d", f"{tag}:w:h", f"{tag}:w:w",
            f"{tag}:w:mo", f"{tag}:r"]  # fmt: skip
    client.hset(keys[0], mapping={"status": "active", "products": "", "price": 50000, "wallet": "prepaid",
                                  "base": 10**15, "spent": 0, "settled": 0, "l_minute": 10**9,
                                  "l_day": 10**12, "saz": 1})  # fmt: skip
    argv = ["0"] * 5 + ["t", "c", "0", "rid", "did", "api", "op", "", "1", "0", "", "0"]
    try:
        print(
            f"Redis {REDIS_URL}, {args.calls:,} calls per variant and round, pipelined by 1,000; "
            f"the median of {args.rounds} rounds run in alternation (this VM's speed drifts)"
        )
        runs: dict[str, Callable[[Any, int], None]] = {}
        for name, (body, with_args) in VARIANTS.items():
            call = (
                [client.script_load(body), len(keys), *keys, *argv]
                if with_args
                else [client.script_load(body), 0]
            )
            runs[name] = lambda pipe, _, call=call: pipe.evalsha(*call)
        decide_sha = client.script_load(Script("decide.lua", "wallet_rules.lua").source)
        now = time.time_ns() // 1_000_000
        real = [*[str(now + 86_400_000)] * 5, "t", "c", str(now), "", "", "api", "op", "", "1", "0", "", "0"]

        def decide(pipe: redis.client.Pipeline, i: int) -> None:
            real[9] = f"d{i}"
            pipe.evalsha(decide_sha, len(keys), *keys, *real)

        runs["decide.lua"] = decide
        measured: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, run in runs.items():
                measured[name].append(usec_per_call(client, run, args.calls))
        print(f"{'variant':<16} {'us per call':>12}")
        for name, figures in measured.items():
            print(f"{name:<16} {statistics.median(figures):>12.1f}")
    finally:
        delete_prefix(REDIS_URL, prefix)
    return 0


if __name__ == "__main__":
    sys.exit(main())
