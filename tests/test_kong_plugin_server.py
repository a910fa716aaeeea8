"""The plugin server as Kong sees it: query_cmd, StartInstance, instance restarts,
PDK errors, process model, shutdown; and the emulator failing loudly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kong.emulator import (
    REPO,
    KongEmulator,
    KongRequest,
    PdkMethod,
    PdkPhaseError,
    RpcError,
    SchemaError,
    UnemulatedPdkCall,
    apply_schema,
    check_plugin_schema,
    default_pdk,
    plugin_command,
    query_plugin_info,
)
from tests.kong.harness import PluginServer, closed_port, plugin_server, short_dir


@pytest.fixture(scope="module")
def server() -> Iterator[PluginServer]:
    with plugin_server() as running:
        yield running


def unreachable_config(**overrides: object) -> dict[str, object]:
    """A sidecar address nothing answers at (refused at once)."""
    return {"grpc_target": "127.0.0.1:1", "http_url": "http://127.0.0.1:1", "usage": False, **overrides}


def test_query_cmd_dumps_plugin_info_kong_accepts():
    info = query_plugin_info()
    assert info["Name"] == "aforo-authorize"
    assert sorted(info["Phases"]) == ["access", "log"]
    assert info["Priority"] == 901
    assert info["Version"] == "0.1.0"
    check_plugin_schema(info)
    stored = apply_schema(info, {})
    assert stored["timeout_ms"] == 50
    assert stored["fail_mode"] == "open"
    assert stored["consumer_identity"] == "consumer_id"
    assert stored["product"] is None and stored["cost"] is None


@pytest.mark.parametrize(
    "config",
    [
        {"fail_mode": "sideways"},
        {"timeout_ms": 0},
        {"timeout_ms": "50"},
        {"consumer_identity": "ip"},
        {"product": ""},
        {"usage_headers": ["user-agent", 7]},
        {"no_such_field": True},
    ],
)
def test_kong_refuses_invalid_configs_by_schema(config):
    with pytest.raises(SchemaError):
        apply_schema(query_plugin_info(), config)


def test_the_plugin_refuses_configs_kong_did_not_validate(server):
    """A config that bypassed the Admin API fails StartInstance with a clear message."""
    base = apply_schema(server.info, {})
    for change, words in [
        ({"tenant": "a b"}, "tenant"),
        ({"timeout_ms": 0}, "timeout_ms"),
        ({"http_url": "ftp://x"}, "http_url"),
        ({"surprise": 1}, "surprise"),
    ]:
        with pytest.raises(RpcError) as caught:
            server.kong.call(
                "plugin.StartInstance", {"Name": "aforo-authorize", "Config": json.dumps({**base, **change})}
            )
        assert words in str(caught.value.error)


def test_a_lost_instance_is_started_again_as_kong_does(server):
    instance = server.kong.start_instance(unreachable_config())
    assert server.kong.play(instance, KongRequest(consumer={"id": "c1"})).proxied
    server.kong.close_instance(instance)
    with pytest.raises(RpcError, match="no plugin instance"):
        server.kong.call("plugin.HandleEvent", {"InstanceId": instance.id, "EventName": "access"})
    again = server.kong.play(instance, KongRequest(consumer={"id": "c1"}))
    assert again.proxied
    assert instance.starts == 2


def test_a_failing_pdk_call_follows_the_fail_mode(server):
    """Kong answers a failed PDK function with StepError; the plugin must not hang.
    (With kong-pdk's lua-style results, which the start command turns off, the error
    would come back as a (None, "boom") value and pass for a missing consumer.)"""
    broken = KongRequest(consumer={"id": "c1"}, pdk_errors={"kong.client.get_consumer": "boom"})
    opened = server.kong.start_instance(unreachable_config(fail_mode="open"))
    closed = server.kong.start_instance(unreachable_config(fail_mode="closed"))
    passed = server.kong.play(opened, broken)
    assert passed.proxied
    assert passed.access.calls[0].step == "plugin.StepError"
    refused = server.kong.play(closed, broken)
    assert (refused.status, refused.exit.body["reason"]) == (500, "plugin_error")


def test_the_emulator_fails_loudly_on_a_pdk_method_it_does_not_emulate(server):
    pdk = default_pdk()
    del pdk["kong.router.get_service"]
    partial = KongEmulator(server.process.socket_path, server.info, pdk=pdk)
    instance = partial.start_instance(unreachable_config())
    with pytest.raises(UnemulatedPdkCall, match=r"kong\.router\.get_service"):
        partial.play(instance, KongRequest(consumer={"id": "c1"}))
    partial.close()
    # The plugin's handler thread was answered (StepError): the server still serves.
    assert server.kong.play(
        server.kong.start_instance(unreachable_config()), KongRequest(consumer={"id": "c1"})
    ).proxied


def test_the_emulator_refuses_a_pdk_call_in_the_wrong_phase(server):
    pdk = default_pdk()
    pdk["kong.client.get_consumer"] = PdkMethod(frozenset({"log"}), lambda s, a: None, "plugin.StepConsumer")
    strict = KongEmulator(server.process.socket_path, server.info, pdk=pdk)
    with pytest.raises(PdkPhaseError, match="access"):
        strict.play(strict.start_instance(unreachable_config()), KongRequest(consumer={"id": "c1"}))
    strict.close()


def test_get_status_lists_the_instances(server):
    instance = server.kong.start_instance(unreachable_config())
    status = server.kong.call("plugin.GetStatus")
    ids = [i["Id"] for i in status["Plugins"]["aforo-authorize"]["Instances"]]
    assert instance.id in ids
    assert server.kong.call("plugin.InstanceStatus", instance.id)["Config"]["grpc_target"] == "127.0.0.1:1"


def test_other_process_models_are_refused():
    for flag in ("-g", "--gevent", "-m", "--multiprocessing"):
        done = subprocess.run(
            [*plugin_command("/tmp"), flag], capture_output=True, text=True, timeout=60, cwd=REPO, check=False
        )
        assert done.returncode == 2, done.stderr
        assert "threading mode" in done.stderr


def test_sigterm_stops_the_server_cleanly():
    with plugin_server() as running:
        instance = running.kong.start_instance(unreachable_config())
        assert running.kong.play(instance, KongRequest(consumer={"id": "c1"})).proxied
        started = time.monotonic()
        # A pooled Kong connection is still open: the server must not wait for it.
        assert running.stop() == 0
        assert time.monotonic() - started < 15
        assert "plugin server stopped" in running.process.log_text()


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def test_the_server_stops_when_kong_goes_away():
    """Kong is the plugin server's parent; an orphaned server must not live on."""
    prefix = short_dir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = " ".join(plugin_command(prefix))
    # A parent shell that starts the server, reports its pid, and exits.
    parent = subprocess.run(
        ["sh", "-c", f"{command} >{prefix}/server.log 2>&1 & echo $!; sleep 3"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    pid = int(parent.stdout.strip())
    try:
        deadline = time.monotonic() + 20
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        stopped = _gone(pid)
        if not stopped:
            os.kill(pid, 9)
        log = Path(prefix, "server.log").read_text()
    finally:
        shutil.rmtree(prefix, ignore_errors=True)
    assert stopped, log
    assert "went away" in log


def test_fail_open_needs_no_sidecar_at_all(server):
    with closed_port() as port:
        instance = server.kong.start_instance(
            unreachable_config(grpc_target=f"127.0.0.1:{port}", http_url=f"http://127.0.0.1:{port}")
        )
        exchanges = [server.kong.play(instance, KongRequest(consumer={"id": "c1"})) for _ in range(3)]
    assert all(e.proxied and e.status == 200 for e in exchanges)
    assert all(e.header("X-RateLimit-Limit-Minute") is None for e in exchanges)
    assert [e.access.methods for e in exchanges] == [
        ["kong.client.get_consumer", "kong.router.get_service"]
    ] * 3


def test_usage_off_makes_the_log_phase_free(server):
    instance = server.kong.start_instance(unreachable_config(usage=False))
    exchange = server.kong.play(instance, KongRequest(consumer={"id": "c1"}))
    assert exchange.log is not None
    assert exchange.log.methods == []
    assert exchange.log.rpcs == 1
