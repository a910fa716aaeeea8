"""docker-compose.kong.yml, checked without a Docker engine: its structure, and that
the plugin server commands it gives Kong really start the plugin server and that the
plugin config it creates is one Kong and the plugin accept."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kong.emulator import REPO, KongEmulator, PluginServerProcess, apply_schema, query_plugin_info
from tests.kong.harness import short_dir

COMPOSE = REPO / "docker-compose.kong.yml"
RUN_PLUGIN = [sys.executable, "-m", "kong_plugin.server"]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def kong_env(compose: dict[str, Any]) -> dict[str, str]:
    return compose["services"]["kong"]["environment"]


def local(command: str, prefix: str | None = None) -> list[str]:
    """A command line of the compose file as it runs here: the installed
    `aforo-kong-plugin` script is `python -m kong_plugin.server`."""
    argv = shlex.split(command)
    assert Path(argv[0]).name == "aforo-kong-plugin", argv
    args = argv[1:]
    if prefix is not None:
        args[args.index("-p") + 1] = prefix
    return RUN_PLUGIN + args


def test_services_and_their_order(compose):
    services = compose["services"]
    assert {"kong-database", "kong-migrations", "kong", "redis", "sidecar", "reconciler"} <= set(services)
    assert services["kong-migrations"]["command"] == ["kong", "migrations", "bootstrap"]
    assert services["kong"]["depends_on"]["kong-migrations"]["condition"] == "service_completed_successfully"
    assert services["kong"]["depends_on"]["sidecar"]["condition"] == "service_healthy"
    assert services["kong"]["environment"]["KONG_DATABASE"] == "postgres"
    assert services["kong"]["environment"]["KONG_PG_HOST"] == "kong-database"
    assert services["kong"]["image"] == services["kong-migrations"]["image"]
    assert "FROM kong:3." in services["kong-migrations"]["build"]["dockerfile_inline"]
    # The sidecar image's entry point is aforo-sidecar: `reconcile` is `aforo-sidecar reconcile`.
    sidecar_build = services["aforo-migrations"]["build"]["dockerfile_inline"]
    assert 'ENTRYPOINT ["aforo-sidecar"]' in sidecar_build
    assert services["reconciler"]["command"] == ["reconcile"]
    assert (
        services["reconciler"]["image"]
        == services["sidecar"]["image"]
        == services["aforo-migrations"]["image"]
    )
    assert services["sidecar"]["environment"]["AFORO_REDIS_URL"] == "redis://redis:6379/0"
    assert "--grpc-port" in services["sidecar"]["command"]
    for name in ("sidecar", "reconciler", "aforo-migrations"):
        assert services[name]["environment"]["AFORO_DATABASE_URL"].startswith("postgresql://")


def test_sidecar_image_commands_are_ones_aforo_sidecar_accepts(compose):
    from sidecar.cli import _parser

    for name in ("aforo-migrations", "sidecar", "reconciler"):
        command = compose["services"][name]["command"]
        _parser().parse_args(command)  # SystemExit on an unknown command or flag
    assert compose["services"]["sidecar"]["command"][0] == "serve"


def test_kong_is_configured_for_the_plugin_server(compose, kong_env):
    assert "aforo-authorize" in kong_env["KONG_PLUGINS"].split(",")
    assert kong_env["KONG_PLUGINSERVER_NAMES"] == "aforo"
    start = shlex.split(kong_env["KONG_PLUGINSERVER_AFORO_START_CMD"])
    prefix = start[start.index("-p") + 1]
    # The socket Kong connects to is where the dedicated server listens.
    assert kong_env["KONG_PLUGINSERVER_AFORO_SOCKET"] == f"{prefix}/aforo-authorize.sock"
    build = compose["services"]["kong-migrations"]["build"]["dockerfile_inline"]
    assert "ln -s /opt/aforo/bin/aforo-kong-plugin /usr/local/bin/aforo-kong-plugin" in build
    assert start[0] == "/usr/local/bin/aforo-kong-plugin"


def test_the_query_cmd_dumps_the_plugin(kong_env):
    done = subprocess.run(
        local(kong_env["KONG_PLUGINSERVER_AFORO_QUERY_CMD"]),
        capture_output=True,
        cwd=REPO,
        timeout=60,
        check=True,
    )
    (info,) = json.loads(done.stdout)
    assert info["Name"] == "aforo-authorize"


def test_the_start_cmd_starts_the_plugin_server_where_kong_looks(compose, kong_env):
    prefix = short_dir()
    socket_name = Path(kong_env["KONG_PLUGINSERVER_AFORO_SOCKET"]).name
    server = PluginServerProcess(
        prefix, local(kong_env["KONG_PLUGINSERVER_AFORO_START_CMD"], prefix), socket_name=socket_name
    )
    server.start()
    try:
        info = query_plugin_info()
        kong = KongEmulator(server.socket_path, info)
        assert kong.call("plugin.GetPluginInfo", "aforo-authorize")["Name"] == "aforo-authorize"
        # The plugin config the setup service creates is valid for Kong and the plugin.
        script = compose["services"]["setup"]["command"][0]
        match = re.search(r"-d '(\{\s*\"name\": \"aforo-authorize\".*?\})'", script, re.S)
        assert match, script
        config = json.loads(match.group(1))["config"]
        instance = kong.start_instance(config)
        assert apply_schema(info, config)["grpc_target"] == "sidecar:9090"
        assert instance.id >= 0
        kong.close()
        assert server.stop() == 0
    finally:
        server.kill()
        shutil.rmtree(prefix, ignore_errors=True)


def test_the_cluster_profile_runs_the_sidecar_on_a_cluster(compose, tmp_path):
    """The optional "cluster" profile: six nodes, a one-shot `--cluster create`, and a
    sidecar and reconciler whose URL names the cluster's nodes. The node command line
    is run here with redis-server itself: its flags are valid, and the host name it
    announces is what the sidecar's slot table reads."""
    from sidecar.store.slots import ranges_from_shards
    from sidecar.store.target import parse_redis_target
    from tests.redis_servers import RedisServer, free_port

    services = compose["services"]
    nodes = [f"redis-node-{n}" for n in range(1, 7)]
    for name in [*nodes, "redis-cluster-init", "sidecar-cluster", "reconciler-cluster"]:
        assert services[name]["profiles"] == ["cluster"], name
    for name in ("sidecar", "reconciler", "redis"):
        assert "profiles" not in services[name]  # the default stack is unchanged
    init = services["redis-cluster-init"]
    assert set(init["depends_on"]) == set(nodes)
    assert "--cluster create" in init["command"][0] and "--cluster-replicas 1" in init["command"][0]
    for name in ("sidecar-cluster", "reconciler-cluster"):
        target = parse_redis_target(services[name]["environment"]["AFORO_REDIS_URL"])
        assert target.topology == "cluster"
        assert {host for host, _ in target.hosts} <= set(nodes)
        assert (
            services[name]["depends_on"]["redis-cluster-init"]["condition"]
            == "service_completed_successfully"
        )

    shell = services["redis-node-1"]["command"][2]
    argv = shlex.split(shell.replace("$$HOSTNAME", "localhost"))
    assert argv[:2] == ["exec", "redis-server"]
    args = argv[2:]
    port = free_port()
    args[args.index("--port") + 1] = str(port)
    server = RedisServer(str(tmp_path / "node"), *args, "--cluster-port", str(free_port()), port=port)
    server.start()
    try:
        client = server.client()
        client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        reply = client.execute_command("CLUSTER", "SHARDS")
        # redis-py decodes the reply into dicts; the sidecar reads the raw arrays.
        raw = [[k for kv in shard.items() for k in (kv[0], _flat(kv[1]))] for shard in reply]
        (only,) = ranges_from_shards(raw, ("127.0.0.1", port))
        assert (only.start, only.end, only.master) == (0, 16383, ("localhost", port))
    finally:
        server.stop()


def _flat(value: Any) -> Any:
    """A redis-py-decoded CLUSTER SHARDS value back into RESP2 shape."""
    if isinstance(value, list):
        return [_flat(v) for v in value]
    if isinstance(value, dict):
        return [x for kv in value.items() for x in (kv[0], _flat(kv[1]))]
    return value
