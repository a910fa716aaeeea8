"""The sidecar on a Redis it reaches over TLS (``rediss://``, issue 18): decisions (the
pipelined connection) and admin calls (redis-py) both go over TLS and count exactly;
the Redis certificate is verified (a CA the process does not trust is refused: the
decision falls to the fail mode). redis-server started here with its TLS port."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import ADMIN, free_port, seed
from tests.redis_servers import RedisServer
from tests.test_tls import Pki, pki  # noqa: F401 (the module-scoped fixture)

pytestmark = pytest.mark.slow


@pytest.fixture
def tls_redis(tmp_path, pki: Pki):  # noqa: F811
    port = free_port()
    server = RedisServer(
        str(tmp_path / "redis-tls"),
        "--tls-port", str(port),
        "--tls-cert-file", str(pki.server.cert),
        "--tls-key-file", str(pki.server.key),
        "--tls-ca-cert-file", str(pki.ca.cert),
        "--tls-auth-clients", "no",
    )  # fmt: skip
    server.start()
    yield f"rediss://127.0.0.1:{port}/0"
    server.kill()


async def test_decisions_and_admin_calls_over_tls(start_sidecar, tls_redis, pki, prefix):  # noqa: F811
    env = {"AFORO_REDIS_URL": tls_redis, "AFORO_KEY_PREFIX": prefix, "SSL_CERT_FILE": str(pki.ca.cert)}
    sidecar = start_sidecar(env)
    async with (
        httpx.AsyncClient(base_url=sidecar.url) as main,
        httpx.AsyncClient(base_url=sidecar.decision_url) as fast,
    ):
        await seed(main, windows={"day": 3}, consumer_id="c1")
        reasons = [
            (await fast.post("/v1/authorize", json={"consumer_id": "c1", "product": "api"})).json()
            for _ in range(4)
        ]
        assert [r["reason"] for r in reasons] == ["ok", "ok", "ok", "quota_exceeded"]
        assert not any(r["degraded"] for r in reasons)
        view = (await main.get("/v1/admin/consumers/c1", headers=ADMIN)).json()
        assert view["windows"]["day"] == 3


async def test_a_redis_certificate_it_does_not_trust_is_refused(start_sidecar, tls_redis, prefix):
    sidecar = start_sidecar({"AFORO_REDIS_URL": tls_redis, "AFORO_KEY_PREFIX": prefix})
    async with httpx.AsyncClient(base_url=sidecar.decision_url) as fast:
        answer = (await fast.post("/v1/authorize", json={"consumer_id": "c1", "product": "api"})).json()
    assert answer["degraded"] is True and answer["reason"] == "store_unavailable"
