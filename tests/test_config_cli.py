"""Settings validation and the command line, run as a user runs it."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import socket
import subprocess
import sys
import time

import httpx
import pytest

from sidecar.config import Settings, SettingsError, load_settings
from tests.conftest import free_port


def test_defaults_run_on_the_embedded_store_fail_open():
    settings = load_settings(environ={})
    assert settings.redis_url is None
    assert (settings.host, settings.port, settings.workers) == ("127.0.0.1", 8080, 1)
    assert settings.fail_mode == "open" and settings.fail_open("any-tenant")


def test_environment_and_overrides_are_layered():
    env = {
        "AFORO_PORT": "9000",
        "AFORO_FAIL_MODE": "closed",
        "AFORO_TENANT_FAIL_MODES": "acme=open, beta=closed",
        "AFORO_UNRELATED_TOOL_SETTING": "ignored",
    }
    settings = load_settings({"port": 9100}, environ=env)
    assert settings.port == 9100  # flags beat the environment
    assert settings.fail_mode == "closed"
    assert settings.fail_open("acme") and not settings.fail_open("beta")
    assert not settings.fail_open("other")


def test_to_env_rebuilds_the_same_settings():
    settings = load_settings(
        {"redis_url": "redis://127.0.0.1:6379/3", "workers": 3, "tenant_fail_modes": "a=closed"},
        environ={},
    )
    assert load_settings(environ=settings.to_env()) == settings


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"port": "eighty"}, "port"),
        ({"port": 70000}, "port 70000 is out of range"),
        ({"fail_mode": "sometimes"}, "fail_mode 'sometimes' is not one of: open, closed (AFORO_FAIL_MODE)"),
        ({"kong_consumer_field": "x"}, "is not one of: id, custom_id, username (AFORO_KONG_CONSUMER_FIELD)"),
        ({"workers": 2}, "workers > 1 needs redis_url"),
        ({"redis_url": "http://localhost:6379"}, "is not a Redis URL"),
        ({"decision_timeout_ms": 0}, "decision_timeout_ms 0 is out of range"),
        ({"introspect_per_second": 0}, "introspect_per_second 0 is out of range"),
        ({"auth_failure_limit": 0}, "auth_failure_limit 0 is out of range"),
        ({"admin_token": "short"}, "admin_token must be at least 16 characters"),
        ({"tenant_fail_modes": "acme"}, "tenant_fail_modes expects entries like tenant=closed"),
        ({"tenant_fail_modes": "acme=half"}, "tenant_fail_modes"),
        ({"key_prefix": "a{b}:"}, "key_prefix must not contain braces"),
        ({"log_level": "loud"}, "log_level 'loud' is not one of: critical, error, warning, info, debug"),
        ({"workers": "two"}, "workers: Expected `int`, got `str` (AFORO_WORKERS)"),
    ],
)
def test_bad_values_are_refused_with_a_message_naming_them(values, message):
    with pytest.raises(SettingsError, match=re.escape(message)):
        load_settings(values, environ={})


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AFORO_")}
    clean.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "sidecar.cli", *args],
        capture_output=True,
        text=True,
        env=clean,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["serve", "--port", "0"], {}, "port 0 is out of range"),
        (["serve", "--fail-mode", "maybe"], {}, "fail_mode"),
        (["serve", "--workers", "4"], {}, "workers > 1 needs redis_url"),
        (["serve"], {"AFORO_REDIS_URL": "mysql://db"}, "is not a Redis URL"),
    ],
)
def test_serve_refuses_a_bad_value_at_start(args, env, message):
    result = _cli(*args, env=env)
    assert result.returncode == 2
    assert "configuration error" in result.stderr and message in result.stderr


def test_demo_serves_the_catalog_and_its_printed_curl_lines_work():
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AFORO_")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-u",
            "-m",
            "sidecar.cli",
            "demo",
            "--port",
            str(port),
            "--grpc-port",
            "0",
            "--decision-port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=clean,
    )
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 20
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "Uvicorn running" in line or "Application startup complete" in line:
                break
        curls = [line.strip() for line in lines if line.startswith("curl ")]
        assert len(curls) >= 6
        apigee = next(c for c in curls if "/integrations/apigee/authorize" in c)
        # Run the printed command itself (it is what the demo tells a user to paste).
        answer = subprocess.run(shlex.split(apigee), capture_output=True, text=True, timeout=10)
        assert '"remainingBalance":9.95' in answer.stdout
        token = re.search(r"admin token: (\S+)", "".join(lines))
        assert token is not None
        view = httpx.get(
            f"http://127.0.0.1:{port}/v1/admin/consumers/app-pro",
            headers={"Authorization": f"Bearer {token.group(1)}"},
        ).json()
        assert view["balance"] == 9_950_000
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize("held", ["AFORO_DECISION_PORT", "AFORO_PORT", "AFORO_GRPC_PORT"])
def test_make_run_with_a_busy_port_stops_with_one_line_and_no_token(held):
    """`make run` (the demo) with one of its three ports held by another program: exit 2
    and one line naming the port and the setting, before the banner, the admin token
    or a traceback."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AFORO_")}
    env.update({name: str(free_port()) for name in ("AFORO_PORT", "AFORO_DECISION_PORT", "AFORO_GRPC_PORT")})
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", int(env[held])))
        holder.listen()
        result = subprocess.run(
            ["make", "--no-print-directory", "-s", "run"],
            cwd=root,
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
    assert result.returncode != 0
    assert "admin token" not in result.stdout and "Traceback" not in result.stderr + result.stdout
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("aforo-sidecar:")]
    assert f"port {env[held]} on 127.0.0.1 is already in use" in line
    assert held in line


def _flags() -> list[tuple[str, argparse.Action]]:
    """Every optional flag of every command, with the command's name."""
    from sidecar.cli import _parser

    found = []
    commands = [("", _parser())]
    while commands:
        name, parser = commands.pop()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                commands += [(f"{name} {sub}".strip(), p) for sub, p in action.choices.items()]
            elif action.option_strings and action.dest not in ("help", "version"):
                found.append((name, action))
    return found


def test_every_flag_says_its_variable_and_default():
    flags = _flags()
    assert {"serve", "demo", "reconcile", "apigee-pull", "audit verify"} <= {name for name, _ in flags}
    for command, action in flags:
        flag = action.option_strings[-1]
        text = action.help or ""
        if action.const is True:  # a switch: off unless given
            continue
        assert "default" in text or "required" in text, f"{command} {flag}: no default in {text!r}"
        setting = flag.removeprefix("--").replace("-", "_")
        if setting in Settings.__struct_fields__:
            assert f"AFORO_{setting.upper()}" in text, f"{command} {flag}: no variable in {text!r}"


def test_a_bare_audit_says_which_tool_is_missing():
    result = _cli("audit")
    assert result.returncode == 2
    assert "aforo-sidecar audit verify" in result.stderr and "audit_command" not in result.stderr


def test_the_readme_configuration_table_has_a_row_per_setting():
    """Each field of Settings, with its variable, in README's Configuration table; and
    no row for a field that does not exist."""
    with open(os.path.join(os.path.dirname(__file__), "..", "README.md")) as readme:
        text = readme.read()
    table = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `(\w+)` \| `(AFORO_\w+)` \|", table, re.MULTILINE))
    assert set(rows) == set(Settings.__struct_fields__)
    assert all(variable == f"AFORO_{field.upper()}" for field, variable in rows.items())
