"""Settings validation and the command line, run as a user runs it."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time

import httpx
import pytest

from sidecar.config import SettingsError, load_settings
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
        ({"fail_mode": "sometimes"}, "fail_mode"),
        ({"workers": 2}, "workers > 1 needs redis_url"),
        ({"redis_url": "http://localhost:6379"}, "is not a Redis URL"),
        ({"decision_timeout_ms": 0}, "decision_timeout_ms 0 is out of range"),
        ({"admin_token": "short"}, "admin_token must be at least 16 characters"),
        ({"tenant_fail_modes": "acme"}, "tenant_fail_modes expects entries like tenant=closed"),
        ({"tenant_fail_modes": "acme=half"}, "tenant_fail_modes"),
        ({"key_prefix": "a{b}:"}, "key_prefix must not contain braces"),
        ({"log_level": "loud"}, "log_level"),
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
