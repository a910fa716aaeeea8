"""The Kong plugin to a sidecar that requires mutual TLS (issue 18): with the CA that
signed the sidecar and a client certificate, every transport (gRPC, the HTTP port, the
decision port) decides and counts exactly, and usage arrives; a plugin that does not
trust the sidecar's certificate, or presents none, gets no answer and the fail mode
decides, nothing counted. Real plugin server, Kong emulator, sidecar process, the
tests' own CA (tests/test_tls.py)."""

from __future__ import annotations

import ssl
from collections.abc import Iterator

import pytest

from kong_plugin.schema import Config, ConfigError
from tests.kong.emulator import KongRequest
from tests.kong.harness import (
    Admin,
    PluginServer,
    Sidecar,
    module_sidecar,
    plugin_server,
    sidecar_config,
    unique,
    wait_for_events,
)
from tests.test_tls import Pki, pki  # noqa: F401 (the module's CA and certificates)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sidecar(redis_url: str, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:  # noqa: F811
    verify = ssl.create_default_context(cafile=str(pki.ca.cert))
    verify.load_cert_chain(str(pki.client.cert), str(pki.client.key))
    env = {
        "AFORO_TLS_CERT_FILE": str(pki.server.cert),
        "AFORO_TLS_KEY_FILE": str(pki.server.key),
        "AFORO_TLS_CLIENT_CA_FILE": str(pki.ca.cert),
    }
    folder = str(tmp_path_factory.mktemp("sidecar"))
    with module_sidecar(redis_url, folder, "kongtls", verify=verify, **env) as process:
        yield process


@pytest.fixture(scope="module")
def server() -> Iterator[PluginServer]:
    with plugin_server() as running:
        yield running


def _tls(pki: Pki, client: bool = True, ca: str | None = None) -> dict[str, object]:  # noqa: F811
    fields: dict[str, object] = {"grpc_tls": True, "tls_ca_file": ca or str(pki.ca.cert)}
    if client:
        fields |= {"tls_client_cert_file": str(pki.client.cert), "tls_client_key_file": str(pki.client.key)}
    return fields


def _consumer(sidecar: Sidecar) -> tuple[Admin, str]:
    """A consumer of its own on a plan of 3 calls a day."""
    admin = sidecar.admin()
    plan, cid = unique("plan"), unique("c")
    admin.plan(plan, {"day": 3})
    admin.consumer(cid, plan)
    return admin, cid


TRANSPORTS = {
    "grpc": lambda sidecar: {"http_fallback": False},
    "http port": lambda sidecar: {"protocol": "http"},
    "decision port": lambda sidecar: {"protocol": "http", "decision_url": sidecar.decision_url},
}


@pytest.mark.parametrize("transport", list(TRANSPORTS))
def test_the_plugin_decides_over_mutual_tls_on_every_transport(
    server,
    sidecar,
    redis_url,
    pki,  # noqa: F811
    transport,
):
    admin, cid = _consumer(sidecar)
    config = sidecar_config(sidecar, fail_mode="closed", **TRANSPORTS[transport](sidecar), **_tls(pki))
    assert config["http_url"].startswith("https://")
    instance = server.kong.start_instance(config)
    exchanges = [server.kong.play(instance, KongRequest(consumer={"id": cid})) for _ in range(4)]
    assert [e.status for e in exchanges] == [200, 200, 200, 429]
    assert exchanges[3].exit.body["reason"] == "quota_exceeded"  # the sidecar's answer, not the fail mode
    assert admin.view(cid)["windows"]["day"] == 3
    events = wait_for_events(redis_url, sidecar.prefix, cid, 3)
    assert len(events) == 3 and all(e.decision_id for e in events)


@pytest.mark.parametrize("transport", list(TRANSPORTS))
def test_without_the_right_certificates_the_fail_mode_answers_and_nothing_counts(
    server,
    sidecar,
    pki,  # noqa: F811
    transport,
):
    admin, cid = _consumer(sidecar)
    for fields in (
        _tls(pki, client=False),  # mutual TLS: no client certificate
        _tls(pki, ca=str(pki.stranger.cert)),  # a CA that did not sign the sidecar's certificate
    ):
        config = sidecar_config(sidecar, fail_mode="closed", timeout_ms=500, **TRANSPORTS[transport](sidecar))
        instance = server.kong.start_instance({**config, **fields})
        refused = server.kong.play(instance, KongRequest(consumer={"id": cid}))
        assert (refused.status, refused.proxied) == (503, False)
        assert refused.exit.body["reason"] == "sidecar_unavailable"
    assert admin.view(cid)["windows"]["day"] == 0


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"tls_client_cert_file": "x.pem"}, "go together"),
        ({"tls_ca_file": "/nonexistent/ca.pem"}, "not found"),
        ({"tls_client_cert_file": "{garbage}", "tls_client_key_file": "{garbage}"}, "do not load"),
    ],
)
def test_tls_files_that_cannot_work_fail_the_config(change, words, tmp_path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(ConfigError, match=words):
        Config.parse({name: value.format(garbage=garbage) for name, value in change.items()})
