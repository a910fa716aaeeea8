"""The Apigee shared flow played step by step (apigee_policy/tests/lib/flow-player.js runs
the real policy XML, conditions and JavaScript) against a REAL sidecar process on Redis:
seeded here through the admin API, then driven by `node --test` with its URLs in the
environment. Afterwards the sidecar's own state is checked: what the flow let through was
counted and charged, and its usage events were stored."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import uuid

import httpx
import pytest

from sidecar.store.redis_store import RedisStore
from tests.conftest import ADMIN, SidecarProcess, seed
from tests.test_apigee_bundle import node_test
from tests.test_tls import Pki, _probe, pki  # noqa: F401 (the tests' CA and certificates)

PRODUCT = "weather-api"
TENANT = "default"


def _flow_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AFORO_FLOW_")}
    env.update(values)
    return env


def _start(start_sidecar, redis_url: str, prefix: str, probe=None, **extra: str) -> SidecarProcess:  # type: ignore[no-untyped-def]
    # gRPC is not needed here; the decision port answers /integrations/apigee/authorize.
    # A generous store deadline: on a loaded test machine a slow Redis answer must not turn
    # into the sidecar's own degraded allow (which counts nothing).
    env = {
        "AFORO_REDIS_URL": redis_url,
        "AFORO_KEY_PREFIX": prefix,
        "AFORO_GRPC_PORT": "0",
        "AFORO_DECISION_TIMEOUT_MS": "2000",
        **extra,
    }
    return start_sidecar(env, probe=probe)


def _gateway_token(url: str, verify: ssl.SSLContext | bool = True) -> str:
    minted = httpx.post(
        f"{url}/v1/admin/tokens", json={"role": "gateway", "name": "apigee"}, headers=ADMIN, verify=verify
    )
    assert minted.status_code == 201, minted.text
    return minted.json()["token"]


async def _seed_apps(url: str, apps: dict[str, str], verify: ssl.SSLContext | bool = True) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=10, verify=verify) as http:
        await seed(http, plan_id="apigee-daily", windows={"day": 1000}, consumer_id=apps["daily"])
        await seed(http, plan_id="apigee-free", consumer_id=apps["fresh"])
        await seed(http, plan_id="apigee-free", consumer_id=apps["suspended"])
        await seed(http, plan_id="apigee-paid", price=50_000, consumer_id=apps["broke"])
        await seed(http, plan_id="apigee-metered", consumer_id=apps["metered"], balance=100_000)
        response = await http.post(
            "/integrations/apigee/suspend",
            json={"appId": apps["suspended"], "developer": "dev@example.com", "reason": "flow test"},
            headers=ADMIN,
        )
        assert response.status_code == 200, response.text


async def _consumer(url: str, consumer_id: str, verify: ssl.SSLContext | bool = True) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=10, verify=verify) as http:
        response = await http.get(f"/v1/admin/consumers/{consumer_id}", headers=ADMIN)
        assert response.status_code == 200, response.text
        return response.json()


async def _events(redis_url: str, prefix: str, consumer_id: str) -> list:
    store = RedisStore(redis_url, prefix=prefix)
    try:
        return await store.events(TENANT, consumer_id)
    finally:
        await store.close()


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "mutual TLS"])
def test_shared_flow_against_a_running_sidecar(
    start_sidecar,
    redis_url: str,
    prefix: str,
    pki: Pki,  # noqa: F811 (the pki fixture)
    tls: bool,
):
    """Acceptance 2: allowed calls proxied and never cached; 1000/day, the 1001st raises
    429 with Retry-After and the next one within ttl_seconds is answered from the cache;
    a suspended app 403, an empty wallet 402; usage reported from the PostClientFlow.
    The sidecar requires gateway tokens: the flow sends its own (the encrypted KVM
    aforo-secrets) on both callouts, or nothing below would be counted nor stored.
    Again with the sidecar requiring mutual TLS on both ports (issue 18): the
    ServiceCallouts' <SSLInfo> trusts its CA (an environment truststore) and presents the
    gateway's client certificate (a keystore and alias), all named in aforo-config."""
    extra = {"AFORO_REQUIRE_GATEWAY_TOKEN": "true"}
    verify: ssl.SSLContext | bool = True
    if tls:
        extra |= {
            "AFORO_TLS_CERT_FILE": str(pki.server.cert),
            "AFORO_TLS_KEY_FILE": str(pki.server.key),
            "AFORO_TLS_CLIENT_CA_FILE": str(pki.ca.cert),
        }
        verify = ssl.create_default_context(cafile=str(pki.ca.cert))
        verify.load_cert_chain(str(pki.client.cert), str(pki.client.key))
    sidecar = _start(
        start_sidecar, redis_url, prefix, probe=_probe(pki, pki.client) if tls else None, **extra
    )
    scheme = "https" if tls else "http"
    url = f"{scheme}://127.0.0.1:{sidecar.port}"
    decision_url = f"{scheme}://127.0.0.1:{sidecar.decision_port}"
    unique = uuid.uuid4().hex[:8]
    apps = {kind: f"apigee-{kind}-{unique}" for kind in ("daily", "fresh", "suspended", "broke", "metered")}
    asyncio.run(_seed_apps(url, apps, verify))
    seed_doc = {"tenant": TENANT, "product": PRODUCT, "apps": apps, "unknown": f"apigee-unknown-{unique}"}
    tls_files = {"ca": str(pki.ca.cert), "cert": str(pki.client.cert), "key": str(pki.client.key)}

    node_test(
        ["tests/flow/sidecar.test.js"],
        timeout=300,
        env=_flow_env(
            AFORO_FLOW_SIDECAR_URL=url,
            AFORO_FLOW_DECISION_URL=decision_url,
            AFORO_FLOW_SEED=json.dumps(seed_doc),
            AFORO_FLOW_GATEWAY_TOKEN=_gateway_token(url, verify),
            **({"AFORO_FLOW_TLS": json.dumps(tls_files)} if tls else {}),
        ),
    )

    # What the sidecar itself recorded.
    daily = asyncio.run(_consumer(url, apps["daily"], verify))
    assert daily["windows"]["day"] == 1000, daily
    metered = asyncio.run(_consumer(url, apps["metered"], verify))
    assert metered["balance"] == 20_000, metered  # 0.10 - 2 x 0.04, the third refused
    events = asyncio.run(_events(redis_url, prefix, apps["fresh"]))
    assert len(events) == 3, events  # two POSTs, one GET through the property-set config
    assert {e.method for e in events} == {"POST", "GET"}
    assert all(e.status == 200 and e.product == PRODUCT and e.decision_id for e in events), events
    assert len({e.request_id for e in events}) == 3
    # Denied calls are not usage.
    assert asyncio.run(_events(redis_url, prefix, apps["daily"])) == []


def test_shared_flow_with_the_sidecar_stopped(start_sidecar, redis_url: str, prefix: str):
    """Acceptance 3: the sidecar stopped (and hanging, and answering garbage): fail open
    lets the call through flagged X-Aforo-Degraded, fail closed raises 503."""
    sidecar = _start(start_sidecar, redis_url, prefix)
    sidecar.stop()
    node_test(
        ["tests/flow/sidecar-down.test.js"],
        timeout=120,
        env=_flow_env(AFORO_FLOW_STOPPED_URL=sidecar.url),
    )
