"""Operators' signals (issue 19): the shipped Prometheus rules pass promtool with a
firing and a silent unit test per alert; the rules and the Grafana dashboard name only
metrics the code defines; and a real Prometheus scraping a sidecar under load and a
reconciler sees them up, deciding and draining, and evaluates the rules cleanly."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from sidecar.config import SettingsError, load_settings
from tests.conftest import ADMIN, SidecarProcess, seed, stop_process
from tests.redis_servers import free_port

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "monitoring" / "prometheus" / "aforo-rules.yml"
RULE_TESTS = ROOT / "monitoring" / "prometheus" / "aforo-rules.test.yml"
DASHBOARD = ROOT / "monitoring" / "grafana" / "aforo-dashboard.json"
# Series Prometheus makes itself, not the sidecar.
SYNTHETIC = {"up"}
# What the dashboard must show (issue 19: decision rate and latency by reason, fail-mode
# answers, store errors, breaker state, reconciler lag and backlog, webhook failures).
DASHBOARD_MUST_SHOW = {
    "aforo_decisions_total",
    "aforo_decision_seconds_bucket",
    "aforo_degraded_decisions_total",
    "aforo_store_errors_total",
    "aforo_store_breaker_open",
    "aforo_reconciler_streams_waiting",
    "aforo_reconciler_last_drain_timestamp_seconds",
    "aforo_webhook_deliveries_total",
}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:  # pragma: no cover - environment problem
        pytest.fail(f"{name} is missing: scripts/ensure-services installs Debian's prometheus package")
    return path


def _alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


# --- promtool ---------------------------------------------------------------------


def test_promtool_checks_the_rules() -> None:
    result = subprocess.run(
        [_tool("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in result.stdout


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    result = subprocess.run(
        [_tool("promtool"), "test", "rules", str(RULE_TESTS)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=RULE_TESTS.parent,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "SUCCESS" in output and "FAILED" not in output, output


def test_every_alert_has_a_test_that_fires_it_and_one_that_does_not() -> None:
    alerts = {rule["alert"]: rule for rule in _alerts()}
    assert len(alerts) == len(_alerts()), "alert names must be unique"
    fires: set[str] = set()
    silent: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            name = check["alertname"]
            assert name in alerts, f"a test of an alert the rules do not have: {name}"
            (fires if check.get("exp_alerts") else silent).add(name)
    assert fires == set(alerts), f"alerts no test fires: {set(alerts) - fires}"
    assert silent == set(alerts), f"alerts no test shows silent: {set(alerts) - silent}"
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


# --- metric names -----------------------------------------------------------------

_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "gauge": ("",),
    "info": ("_info",),
}
_NOT_METRICS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool"}
_NOT_METRICS |= {"and", "or", "unless", "inf", "nan"}


def _defined_metrics() -> set[str]:
    """Every series name the code can expose: each module under sidecar/ that uses
    prometheus_client is imported, and its families read from the default registry."""
    for path in (ROOT / "sidecar").rglob("*.py"):
        if "prometheus_client" in path.read_text():
            importlib.import_module(".".join(path.relative_to(ROOT).with_suffix("").parts))
    names: set[str] = set()
    for family in REGISTRY.collect():
        names |= {family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",))}
        names |= {sample.name for sample in family.samples}
    return names


def _metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (strings, label matchers, ranges,
    grouping clauses and function calls removed)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for found in re.finditer(r"(?<![\w$.])([A-Za-z_:][\w:]*)\s*(\()?", expr):
        if found.group(2) is None and found.group(1).lower() not in _NOT_METRICS:
            names.add(found.group(1))
    return names


def test_the_metric_name_reader_reads_promql() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (job, le) (rate(aforo_decision_seconds_bucket{instance=~"$i"}'
        "[$__rate_interval]))) > 0.025 and on (job) time() - last_drain offset 5m > 1e3 or up"
    )
    assert _metric_names(expr) == {"aforo_decision_seconds_bucket", "last_drain", "up"}


def test_the_code_defines_the_series_the_issue_names() -> None:
    defined = _defined_metrics()
    assert DASHBOARD_MUST_SHOW | {"aforo_reconciler_drained_total"} <= defined


def test_the_rules_read_only_metrics_the_code_defines() -> None:
    defined = _defined_metrics() | SYNTHETIC
    for rule in _alerts():
        names = _metric_names(rule["expr"])
        assert names, rule["alert"]
        assert names <= defined, f"{rule['alert']} reads undefined metrics: {names - defined}"


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expr) of every query of the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"])
        for panel in _panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]


def test_the_dashboard_is_grafana_json_on_a_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36 and dashboard["uid"] and dashboard["title"]
    (source,) = [v for v in dashboard["templating"]["list"] if v["name"] == "DS_PROMETHEUS"]
    assert (source["type"], source["query"]) == ("datasource", "prometheus")
    panels = list(_panels(dashboard["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        uids = {panel["datasource"]["uid"]} | {t["datasource"]["uid"] for t in panel["targets"]}
        assert uids == {"${DS_PROMETHEUS}"}, panel["title"]
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]


def test_the_dashboard_reads_only_metrics_the_code_defines_and_shows_what_it_must() -> None:
    defined = _defined_metrics() | SYNTHETIC
    shown: set[str] = set()
    for title, expr in _dashboard_exprs():
        names = _metric_names(expr)
        assert names, title
        assert names <= defined, f"panel {title!r} reads undefined metrics: {names - defined}"
        shown |= names
    assert shown >= DASHBOARD_MUST_SHOW, f"not on the dashboard: {DASHBOARD_MUST_SHOW - shown}"


def _runnable(expr: str) -> str:
    """A dashboard query as Prometheus would get it from Grafana."""
    return expr.replace("$__rate_interval", "15s").replace("$instance", ".*")


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query, as a recording rule."""
    rules = [
        {"record": f"dashboard:query_{n}", "expr": _runnable(expr)}
        for n, (_, expr) in enumerate(_dashboard_exprs())
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [_tool("promtool"), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


# --- the README -------------------------------------------------------------------


def test_the_readme_names_every_metric_every_alert_and_the_metrics_port() -> None:
    text = (ROOT / "README.md").read_text()
    _defined_metrics()  # imports the modules that define them
    exposed = {
        family.name + ("_total" if family.type == "counter" else "")
        for family in REGISTRY.collect()
        if family.name.startswith("aforo_")
    }
    assert len(exposed) >= 13
    assert {name for name in exposed if f"| `{name}` |" not in text} == set(), "metrics the README lacks"
    table = set(re.findall(r"^\| `(Aforo\w+)` \| (?:critical|warning) \|", text, re.MULTILINE))
    assert table == {rule["alert"] for rule in _alerts()}
    (row,) = [line for line in text.splitlines() if line.startswith("| `reconciler_metrics_port` |")]
    default = load_settings(environ={}).reconciler_metrics_port
    assert f"| `AFORO_RECONCILER_METRICS_PORT` | | `{default}` |" in row


# --- the reconciler's metrics port ------------------------------------------------


def test_the_reconciler_metrics_port_is_a_validated_setting() -> None:
    assert load_settings(environ={}).reconciler_metrics_port == 9466
    assert load_settings(environ={"AFORO_RECONCILER_METRICS_PORT": "0"}).reconciler_metrics_port == 0
    with pytest.raises(SettingsError, match="reconciler_metrics_port 65536 is out of range 0-65535"):
        load_settings(environ={"AFORO_RECONCILER_METRICS_PORT": "65536"})


def test_a_busy_metrics_port_stops_the_reconciler_with_one_line() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AFORO_")}
        env.update(
            {
                # Never reached: the port is checked before Postgres or Redis is.
                "AFORO_DATABASE_URL": "postgresql://127.0.0.1:1/none",
                "AFORO_REDIS_URL": "redis://127.0.0.1:1/0",
                "AFORO_RECONCILER_METRICS_PORT": str(port),
            }
        )
        result = subprocess.run(
            [sys.executable, "-m", "sidecar.cli", "reconcile"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("aforo-sidecar:")]
    assert f"127.0.0.1:{port}" in line and "AFORO_RECONCILER_METRICS_PORT" in line


# --- a real Prometheus ------------------------------------------------------------


class Prometheus:
    """`prometheus` on a loopback port of its own, with its own storage."""

    def __init__(self, tmp_path: Path, jobs: dict[str, str]) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = tmp_path / "prometheus.log"
        config = {
            # A 1 s scrape: the test sees rates within seconds. Its rules are the shipped ones.
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [target]}]} for job, target in jobs.items()
            ],
        }
        config_path = tmp_path / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    _tool("prometheus"),
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={tmp_path / 'prometheus-data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    async def ready(self, http: httpx.AsyncClient, within: float) -> None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"prometheus exited:\n{self.log()}"
            try:
                if (await http.get(f"{self.url}/-/ready")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
        raise AssertionError(f"prometheus did not become ready:\n{self.log()}")

    async def query(self, http: httpx.AsyncClient, expr: str) -> list[dict[str, Any]]:
        response = await http.get(f"{self.url}/api/v1/query", params={"query": expr})
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", (expr, body)
        return body["data"]["result"]

    def stop(self) -> None:
        stop_process(self.proc)


def _value(result: list[dict[str, Any]]) -> float | None:
    """The value of a one-series instant vector; None when there is no series."""
    return float(result[0]["value"][1]) if len(result) == 1 else None


def _wait_for_port(port: int, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"{what} does not listen on {port}")


async def _load(sidecar: SidecarProcess, stop: asyncio.Event, statuses: list[tuple[int, bool]]) -> None:
    """Decisions from 8 concurrent clients until ``stop`` (gateway-like load)."""
    body = {"consumer_id": "c1", "product": "api"}
    async with httpx.AsyncClient(base_url=sidecar.url, timeout=30) as http:

        async def client() -> None:
            while not stop.is_set():
                response = await http.post("/v1/authorize", json=body)
                statuses.append((response.status_code, response.json().get("allow") is True))
                await asyncio.sleep(0.002)

        await asyncio.gather(*(client() for _ in range(8)))


@pytest.mark.slow
async def test_a_real_prometheus_scrapes_a_sidecar_under_load_and_the_reconciler(
    migrated_database, redis_url, prefix, start_sidecar, reconciler, tmp_path
):
    env = {
        "AFORO_REDIS_URL": redis_url,
        "AFORO_KEY_PREFIX": prefix,
        "AFORO_DATABASE_URL": migrated_database,
        "AFORO_DECISION_TIMEOUT_MS": "10000",  # about scraping, not the fail mode
    }
    sidecar = start_sidecar(env)
    metrics_port = free_port()
    reconciler(migrated_database, redis_url, prefix, AFORO_RECONCILER_METRICS_PORT=str(metrics_port))
    _wait_for_port(metrics_port, 20, "the reconciler's metrics endpoint")
    async with httpx.AsyncClient(base_url=sidecar.url) as admin:
        await seed(admin, windows={"day": 10_000_000}, consumer_id="c1")
        assert (await admin.get("/v1/admin/consumers/c1", headers=ADMIN)).status_code == 200

    prometheus = Prometheus(
        tmp_path, {"aforo": f"127.0.0.1:{sidecar.port}", "aforo-reconciler": f"127.0.0.1:{metrics_port}"}
    )
    stop = asyncio.Event()
    statuses: list[tuple[int, bool]] = []
    load = asyncio.create_task(_load(sidecar, stop, statuses))
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            await prometheus.ready(http, 30)
            checks = {
                "sidecar up": ('up{job="aforo"}', lambda v: v == 1),
                "reconciler up": ('up{job="aforo-reconciler"}', lambda v: v == 1),
                "decision rate": ('sum(rate(aforo_decisions_total{job="aforo"}[15s]))', lambda v: v > 0),
                "ok decisions": ('sum(aforo_decisions_total{job="aforo", reason="ok"})', lambda v: v > 0),
                "breaker closed": ('max(aforo_store_breaker_open{job="aforo"})', lambda v: v == 0),
                "usage drained": (
                    'aforo_reconciler_drained_total{job="aforo-reconciler", kind="usage"}',
                    lambda v: v > 0,
                ),
                "drained lately": (
                    'time() - aforo_reconciler_last_drain_timestamp_seconds{job="aforo-reconciler"}',
                    lambda v: v < 30,
                ),
                "backlog known": (
                    'aforo_reconciler_streams_waiting{job="aforo-reconciler"}',
                    lambda v: v >= 0,
                ),
                "gave_up at 0": (
                    'aforo_webhook_deliveries_total{job="aforo-reconciler", result="gave_up"}',
                    lambda v: v == 0,
                ),
            }
            seen: dict[str, float | None] = {}
            deadline = time.monotonic() + 60
            while True:
                for name, (expr, _) in checks.items():
                    seen[name] = _value(await prometheus.query(http, expr))
                held = {n for n, (_, ok) in checks.items() if seen[n] is not None and ok(seen[n])}
                if held == set(checks) and len(statuses) >= 200:
                    break
                assert load.done() is False, load.exception()
                if time.monotonic() > deadline:
                    raise AssertionError(f"after 60 s: {seen}, {len(statuses)} decisions\n{prometheus.log()}")
                await asyncio.sleep(0.5)
            stop.set()
            await load
            assert statuses and all(s == (200, True) for s in statuses), set(statuses)
            # Prometheus counted what the sidecar answered, no more.
            scraped = _value(await prometheus.query(http, 'sum(aforo_decisions_total{job="aforo"})'))
            assert scraped is not None and 0 < scraped <= len(statuses)

            # The shipped rules load and evaluate without error on these series; none fires.
            alerts = {rule["alert"] for rule in _alerts()}

            async def rules_evaluated() -> list[dict[str, Any]]:
                groups = (await http.get(f"{prometheus.url}/api/v1/rules")).json()["data"]["groups"]
                return [rule for group in groups for rule in group["rules"]]

            while {r["name"] for r in await rules_evaluated() if r["health"] == "ok"} != alerts:
                assert time.monotonic() < deadline + 30, await rules_evaluated()
                await asyncio.sleep(0.5)
            assert all(not r.get("lastError") for r in await rules_evaluated())
            assert await prometheus.query(http, 'ALERTS{alertstate="firing"}') == []

            # Every dashboard query runs on a real Prometheus; the decision panel has data.
            for _, expr in _dashboard_exprs():
                await prometheus.query(http, _runnable(expr))
            (by_reason,) = [e for t, e in _dashboard_exprs() if t == "Decision rate by reason"]
            reasons = {r["metric"].get("reason") for r in await prometheus.query(http, _runnable(by_reason))}
            assert "ok" in reasons
    finally:
        stop.set()
        await asyncio.gather(load, return_exceptions=True)
        prometheus.stop()


# --- the breaker gauge ------------------------------------------------------------


def _breaker(sidecar: SidecarProcess, port: int) -> float | None:
    """aforo_store_breaker_open of the Redis node on ``port``, from the sidecar's /metrics."""
    text = httpx.get(f"{sidecar.url}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "aforo_store_breaker_open" and sample.labels["node"].endswith(f":{port}"):
                return sample.value
    return None


@pytest.mark.slow
def test_the_breaker_gauge_opens_when_redis_dies_and_closes_when_it_answers_again(
    private_redis, start_sidecar
):
    sidecar = start_sidecar(
        {
            "AFORO_REDIS_URL": private_redis.url,
            "AFORO_FAIL_MODE": "open",
            "AFORO_DECISION_TIMEOUT_MS": "200",
            "AFORO_BREAKER_COOLDOWN_MS": "500",
        }
    )
    body = {"consumer_id": "c1", "product": "api"}
    with httpx.Client(base_url=sidecar.url, timeout=10) as http:
        plan = http.put("/v1/admin/plans/p", json={"windows": {"day": 1000}}, headers=ADMIN)
        assert plan.status_code == 201
        assert http.put("/v1/admin/consumers/c1", json={"plan_id": "p"}, headers=ADMIN).status_code == 201
        assert http.post("/v1/authorize", json=body).json()["reason"] == "ok"
        assert _breaker(sidecar, private_redis.port) == 0  # a connected node: the series exists, closed

        private_redis.kill()
        for _ in range(3):
            assert http.post("/v1/authorize", json=body).json()["degraded"] is True
        # Set on the transition, not per scrape: it stays open until a decision tries again.
        assert _breaker(sidecar, private_redis.port) == 1

        private_redis.start()  # empty, on the same port
        deadline = time.monotonic() + 10
        while http.post("/v1/authorize", json=body).json().get("degraded"):
            assert time.monotonic() < deadline, "the sidecar never reached Redis again"
            time.sleep(0.1)
        assert _breaker(sidecar, private_redis.port) == 0
