"""Postgres over TLS (issue 18): ``sslmode`` and ``sslrootcert`` in ``AFORO_DATABASE_URL``
reach asyncpg on every connection the sidecar makes (migrations, the admin API's
writes, the reconciler), against a PostgreSQL server of the test's own that refuses
plain text. The server certificate comes from the tests' own CA (tests/test_tls.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import asyncpg
import pytest

from tests.conftest import ADMIN, PrivatePostgres, seed
from tests.test_postgres import _cli, stack
from tests.test_tls import Pki, pki  # noqa: F401 (the module's CA and certificates)

pytestmark = pytest.mark.slow


@pytest.fixture
def tls_postgres(pki: Pki) -> Iterator[PrivatePostgres]:  # noqa: F811
    server = PrivatePostgres()
    server.require_tls(str(pki.server.cert), str(pki.server.key))
    server.start()
    yield server
    server.destroy()


def _url(server: PrivatePostgres, query: str) -> str:
    return f"{server.url}?{query}" if query else server.url


def test_a_database_url_with_verify_full_is_served_over_tls(
    tls_postgres: PrivatePostgres,
    pki: Pki,  # noqa: F811
    redis_url: str,
    prefix: str,
) -> None:
    url = _url(tls_postgres, f"sslmode=verify-full&sslrootcert={pki.ca.cert}")
    migrated = _cli("migrate", "--database-url", url)
    assert migrated.returncode == 0, migrated.stderr

    async def run() -> None:
        async with stack(url, redis_url, prefix) as s:
            await seed(s.http, windows={"day": 5}, consumer_id="c1")
            assert (await s.decide("c1"))["reason"] == "ok"
            # The admin write went to Postgres, over TLS like every connection there.
            assert await s.db.fetchval("SELECT plan_id FROM consumers WHERE id = 'c1'") == "plan"
            encrypted = await s.db.fetchval(
                "SELECT bool_and(ssl) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid)"
                " WHERE client_addr IS NOT NULL"
            )
            assert encrypted is True
            answer = await s.http.get("/v1/admin/consumers/c1", headers=ADMIN)
            assert answer.status_code == 200

    asyncio.run(run())


@pytest.mark.parametrize(
    "query",
    [
        "sslmode=disable",  # plain text: the server refuses it
        "sslmode=verify-full&sslrootcert={stranger}",  # a CA that did not sign the server
    ],
)
def test_without_tls_or_with_the_wrong_ca_nothing_connects(
    tls_postgres: PrivatePostgres,
    pki: Pki,  # noqa: F811
    query: str,
) -> None:
    url = _url(tls_postgres, query.format(stranger=pki.stranger.cert))
    refused = _cli("migrate", "--database-url", url)
    assert refused.returncode != 0

    async def connect() -> None:
        conn = await asyncpg.connect(url, timeout=5)
        await conn.close()

    with pytest.raises((asyncpg.PostgresError, OSError)):
        asyncio.run(connect())
