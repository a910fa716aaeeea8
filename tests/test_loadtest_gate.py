"""The headless Locust gate: passes within budget, fails below what the run achieved."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ADMIN_TOKEN

pytestmark = pytest.mark.slow
LOCUSTFILE = Path(__file__).resolve().parent.parent / "loadtests" / "locustfile.py"


def _locust(sidecar, csv_prefix: Path, budget_ms: float) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AFORO_")}
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", "8", "-r", "8",
        "-t", "6s", "--host", sidecar.decision_url, "--admin-url", sidecar.url,
        "--admin-token", ADMIN_TOKEN, "--grpc-target", sidecar.grpc_target, "--consumers", "60",
        "--p95-budget-ms", str(budget_ms), "--csv", str(csv_prefix), "--only-summary",
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=180)


def test_the_gate_passes_within_budget_and_fails_below_it(redis_url, prefix, start_sidecar, tmp_path):
    sidecar = start_sidecar({"AFORO_REDIS_URL": redis_url, "AFORO_KEY_PREFIX": prefix})
    within = _locust(sidecar, tmp_path / "within", budget_ms=5_000)
    assert within.returncode == 0, within.stderr[-3000:]
    assert "latency gate passed" in within.stderr
    with open(tmp_path / "within_stats.csv") as file:
        rows = {row["Name"]: row for row in csv.DictReader(file)}
    # Both users ran, nothing failed, and decisions of every kind are answers.
    assert int(rows["POST /v1/authorize"]["Request Count"]) > 0
    assert int(rows["Authorize"]["Request Count"]) > 0
    assert int(rows["Aggregated"]["Failure Count"]) == 0
    achieved_p95 = float(rows["Aggregated"]["95%"])

    below = _locust(sidecar, tmp_path / "below", budget_ms=min(achieved_p95 / 10, 0.01))
    assert below.returncode == 1
    assert "latency gate FAILED" in below.stderr and "over the budget" in below.stderr
