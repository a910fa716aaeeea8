"""The Kong plugin with a sidecar that requires gateway tokens (issue 18): with its
``gateway_token`` (a vault-referenceable, encrypted config field) every decision and
usage batch passes, over gRPC and over HTTP to the decision port; without it the fail
mode answers and nothing is counted. Real plugin server, Kong emulator, sidecar process."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.kong.emulator import KongRequest
from tests.kong.harness import (
    PluginServer,
    Sidecar,
    module_sidecar,
    plugin_server,
    sidecar_config,
    unique,
    wait_for_events,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sidecar(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    folder = str(tmp_path_factory.mktemp("sidecar"))
    with module_sidecar(redis_url, folder, "kongtoken", AFORO_REQUIRE_GATEWAY_TOKEN="true") as process:
        yield process


@pytest.fixture(scope="module")
def server() -> Iterator[PluginServer]:
    with plugin_server() as running:
        yield running


@pytest.mark.parametrize("transport", ["grpc", "decision port"])
def test_the_plugin_sends_its_gateway_token(server, sidecar, redis_url, transport):
    admin = sidecar.admin()
    plan, cid = unique("plan"), unique("c")
    admin.plan(plan, {"day": 3})
    admin.consumer(cid, plan)
    minted = admin.http.post("/v1/admin/tokens", json={"role": "gateway", "name": "kong"})
    assert minted.status_code == 201, minted.text
    token = minted.json()["token"]
    extra = {} if transport == "grpc" else {"protocol": "http", "decision_url": sidecar.decision_url}

    without = server.kong.start_instance(sidecar_config(sidecar, fail_mode="closed", **extra))
    refused = server.kong.play(without, KongRequest(consumer={"id": cid}))
    assert refused.status == 503 and not refused.proxied  # fail closed: the sidecar said 401
    assert admin.view(cid)["windows"]["day"] == 0

    with_token = server.kong.start_instance(sidecar_config(sidecar, gateway_token=token, **extra))
    exchanges = [server.kong.play(with_token, KongRequest(consumer={"id": cid})) for _ in range(4)]
    assert [e.status for e in exchanges] == [200, 200, 200, 429]
    assert admin.view(cid)["windows"]["day"] == 3
    # The log phase's usage events (of the proxied calls) go with the token too.
    events = wait_for_events(redis_url, sidecar.prefix, cid, 3)
    assert len(events) == 3 and all(e.decision_id for e in events)
