#!/usr/bin/env python3
"""Would several decisions per EVALSHA halve Redis's work per decision? Measured, not
assumed: ``decide.lua`` run one decision per call (pipelined, N per round trip, as the
sidecar's connection sends them) against a variant that runs N decisions in one call
(the same script body as a Lua function, called N times), for N = 6 (the sidecar's
pipeline chunk) and 16, over 32 consumers.

    python loadtests/batch_profile.py [--decisions 30000] [--rounds 3]

Prints Redis's process CPU (``INFO cpu``, user + system) and script time (``INFO
commandstats``) per decision, the median of the rounds, run in alternation (this VM's
speed drifts). Not a test; keys live under a prefix of their own, deleted after.
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

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from sidecar.store.redis_store import Script  # noqa: E402
from tests.redis_servers import delete_prefix  # noqa: E402

REDIS_URL = os.environ.get("AFORO_REDIS_URL", "redis://127.0.0.1:6379/0")
CONSUMERS = 32
LUA = ROOT / "sidecar" / "store" / "lua"
# decide.lua's body as a function of its own KEYS and ARGV, called once per decision:
# ARGV 1 = how many, ARGV 2 = the apply-by (checked once), then 16 arguments and 9 keys
# per decision (decide.lua's ARGV 1-16 and KEYS 1-9).
BATCH_TAIL = """
local n = tonumber(ARGV[1])
local out = {}
for i = 0, n - 1 do
  local k = {}
  for j = 1, 9 do k[j] = KEYS[9 * i + j] end
  local a = {}
  for j = 1, 16 do a[j] = ARGV[2 + 16 * i + j] end
  a[17] = '0'
  out[i + 1] = one(k, a)
end
return out
"""


def batch_source() -> str:
    rules = (LUA / "wallet_rules.lua").read_text()
    body = (LUA / "decide.lua").read_text()
    return f"{rules}\nlocal function one(KEYS, ARGV)\n{body}\nend\n{BATCH_TAIL}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=30_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    client = redis.Redis.from_url(REDIS_URL)
    prefix = f"batchprofile:{uuid.uuid4().hex[:8]}:"
    single = client.script_load(Script("decide.lua", "wallet_rules.lua").source)
    batch = client.script_load(batch_source())
    now = time.time_ns() // 1_000_000
    consumers = []
    for i in range(CONSUMERS):
        tag = f"{prefix}{{t:c{i}}}"
        keys = [f"{tag}:c", f"{tag}:u", f"{tag}:n", *(f"{tag}:q:{w}" for w in "mhdwM"), f"{tag}:r"]
        fields = {"status": "active", "products": "", "price": 50_000, "wallet": "prepaid", "base": 10**15,
                  "spent": 0, "settled": 0, "l_minute": 10**9, "l_day": 10**12, "saz": 1}  # fmt: skip
        client.hset(keys[0], mapping=fields)
        consumers.append(keys)

    def argv(i: int, d: int) -> list[str]:
        resets = [str(now + 86_400_000)] * 5
        return [*resets, "t", f"c{i}", str(now), "", f"d{d}", "api", "op", "", "1", "0", ""]

    def singles(per: int) -> Callable[[int], None]:
        def run(total: int) -> None:
            for r in range(total // per):
                pipe = client.pipeline(transaction=False)
                for j in range(per):
                    i = (r * per + j) % CONSUMERS
                    pipe.execute_command("EVALSHA", single, 9, *consumers[i], *argv(i, r * per + j), "0")
                pipe.execute()

        return run

    def batched(per: int) -> Callable[[int], None]:
        def run(total: int) -> None:
            for r in range(total // per):
                keys: list[str] = []
                values = [str(per), "0"]
                for j in range(per):
                    i = (r * per + j) % CONSUMERS
                    keys += consumers[i]
                    values += argv(i, r * per + j)
                replies = client.execute_command("EVALSHA", batch, len(keys), *keys, *values)
                assert all(reply[1] == b"ok" for reply in replies), replies[0]

        return run

    def cpu() -> float:
        info = client.info("cpu")
        return info["used_cpu_user"] + info["used_cpu_sys"]

    def script_us() -> int:
        return client.info("commandstats").get("cmdstat_evalsha", {"usec": 0})["usec"]

    variants = {
        "6 calls of 1, pipelined": singles(6),
        "1 call of 6": batched(6),
        "16 calls of 1, pipelined": singles(16),
        "1 call of 16": batched(16),
    }
    measured: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    try:
        for _ in range(args.rounds):
            for name, run in variants.items():
                cpu_before, script_before = cpu(), script_us()
                run(args.decisions)
                measured[name].append(
                    (
                        (cpu() - cpu_before) * 1e6 / args.decisions,
                        (script_us() - script_before) / args.decisions,
                    )
                )
        print(
            f"Redis {REDIS_URL}: {args.decisions:,} allowed decisions per variant and round over "
            f"{CONSUMERS} consumers; the median of {args.rounds} rounds"
        )
        print(f"{'variant':<26} {'CPU µs/decision':>16} {'script µs/decision':>19}")
        for name, figures in measured.items():
            print(
                f"{name:<26} {statistics.median(f[0] for f in figures):>16.1f}"
                f" {statistics.median(f[1] for f in figures):>19.1f}"
            )
    finally:
        delete_prefix(REDIS_URL, prefix)
    return 0


if __name__ == "__main__":
    sys.exit(main())
