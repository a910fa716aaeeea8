#!/usr/bin/env python3
"""What requiring a gateway token costs a decision: two sidecar processes on the same
Redis, one with ``AFORO_REQUIRE_GATEWAY_TOKEN=true`` (wrk sends a minted gateway token)
and one without, the seed workload on the decision port at 32 connections, measured in
alternation (this VM's speed drifts; each side first every other round), N rounds of
5 s each.

    python loadtests/gateway_token_ab.py [--rounds 6]

Prints, per side, the median decisions/s and sidecar CPU µs per decision, the ratio, and
every run (a refused call would count in wrk's errors, so 0 errors means every call was
decided). Not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark as bench


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--duration", type=int, default=5)
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        plain = stack.enter_context(bench.sidecar(1))
        guarded = stack.enter_context(bench.sidecar(1, gateway_token=True))
        header = f'wrk.headers["Authorization"] = "Bearer {guarded["token"]}"\n'
        redis = bench.standalone()
        targets = {
            "no token": bench.Target(
                f"{plain['decision']}{bench.SEED_PATH}", plain["main"], int(plain["pid"]), redis,
                stack.enter_context(bench._lua(bench.WRK_SCRIPT)),
            ),
            "gateway token": bench.Target(
                f"{guarded['decision']}{bench.SEED_PATH}", guarded["main"], int(guarded["pid"]), redis,
                stack.enter_context(bench._lua(header + bench.WRK_SCRIPT)),
            ),
        }  # fmt: skip
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
        for round_ in range(args.rounds):
            # Each side goes first every other round: the second of two back-to-back
            # runs can be slower on this box (Redis, caches, CPU frequency).
            order = list(targets.items()) if round_ % 2 == 0 else list(reversed(targets.items()))
            for name, target in order:
                runs[name].append(bench.measure(target, target.url, 32, args.duration, target.script or ""))
    medians = {}
    for name, results in runs.items():
        rps = statistics.median(r["rps"] for r in results)
        cpu = statistics.median(r["server_us"] for r in results)
        errors = sum(r["errors"] for r in results)
        medians[name] = rps
        print(f"{name:<14} {rps:>9,.0f} decisions/s  {cpu:5.1f} sidecar CPU µs/decision  {errors} errors")
        print("   runs: " + ", ".join(f"{r['rps']:,.0f}" for r in results))
    print(f"with a gateway token: {medians['gateway token'] / medians['no token']:.1%} of the rate without")
    return 0


if __name__ == "__main__":
    sys.exit(main())
