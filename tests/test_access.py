"""Who may do what (issue 18): API tokens with roles, tenant isolation, revocation,
rotation, expiry, refused authentications rate limited, and the one table of rules,
checked against the app's routes and the README. In process over every store (memory,
Redis, Cluster, Sentinel); tests/test_access_postgres.py keeps tokens in Postgres."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.config import Settings
from sidecar.core.access import Role
from sidecar.http.access import ACCESS, describe
from sidecar.http.app import create_app
from tests.conftest import ADMIN, make_settings, seed

README = Path(__file__).resolve().parents[1] / "README.md"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def mint(http: httpx.AsyncClient, role: str, headers: dict[str, str] = ADMIN, **fields: Any) -> str:
    body = {"role": role, "name": f"{role} token", **fields}
    response = await http.post("/v1/admin/tokens", json=body, headers=headers)
    assert response.status_code == 201, response.text
    raw = response.json()["token"]
    assert re.fullmatch(r"aft_[0-9a-f]{16}_[A-Za-z0-9_-]{43}", raw)
    return raw


async def balance(http: httpx.AsyncClient, consumer_id: str, tenant: str = "default") -> int:
    response = await http.get(f"/v1/admin/consumers/{consumer_id}?tenant={tenant}", headers=ADMIN)
    assert response.status_code == 200, response.text
    return response.json()["balance"]


def test_every_route_has_one_rule_and_the_readme_table_says_the_same() -> None:
    app = create_app(make_settings())
    served = {
        (method, route.path)
        for route in app.routes
        for method in (route.methods or set()) - {"HEAD"}  # type: ignore[attr-defined]
    }
    assert served == set(ACCESS)
    text = README.read_text()
    section = text[text.index("<!-- access-table -->") : text.index("<!-- /access-table -->")]
    rows = {
        (m.group(1), m.group(2)): m.group(3).strip()
        for m in re.finditer(r"^\| `(GET|PUT|POST|DELETE) ([^`]+)` \| ([^|]+) \|", section, re.M)
    }
    assert rows == {key: describe(rule) for key, rule in ACCESS.items()}


def test_a_route_without_a_rule_is_refused_at_start() -> None:
    from starlette.responses import Response
    from starlette.routing import Route

    from sidecar.http.access import protect

    async def nothing(request: Any) -> Response:
        return Response()

    with pytest.raises(ValueError, match="no row"):
        protect([Route("/v1/admin/secret", nothing, methods=["GET"])])


async def test_each_role_reads_and_writes_only_what_it_may(client: httpx.AsyncClient) -> None:
    await seed(client, windows={"day": 100}, price=10, consumer_id="c1", balance=1_000)
    await seed(client, windows={"day": 100}, price=10, consumer_id="c2", balance=1_000)
    viewer = bearer(await mint(client, "viewer"))
    billing = bearer(await mint(client, "billing"))
    developer = bearer(await mint(client, "developer", consumers=["c1"]))
    gateway = bearer(await mint(client, "gateway"))

    # viewer: every read, no write (and the write changes nothing)
    for path in ("/v1/admin/plans", "/v1/admin/plans/plan", "/v1/admin/consumers", "/v1/admin/consumers/c2"):
        assert (await client.get(path, headers=viewer)).status_code == 200, path
    writes = [
        ("PUT", "/v1/admin/plans/plan", {"windows": {"day": 1}}),
        ("PUT", "/v1/admin/consumers/c3", {"plan_id": "plan"}),
        ("POST", "/v1/admin/consumers/c1/suspend", {}),
        ("POST", "/v1/admin/consumers/c1/topup", {"amount": 5}),
        ("POST", "/v1/admin/consumers/c1/keys", {}),
        ("DELETE", "/v1/admin/consumers/c2", None),
        ("POST", "/v1/admin/tokens", {"role": "admin", "name": "escalation"}),
    ]
    for method, path, body in writes:
        response = await client.request(method, path, json=body, headers=viewer)
        assert response.status_code == 403, (method, path, response.text)
        assert response.json()["error"]["code"] == "forbidden"
    plan = (await client.get("/v1/admin/plans/plan", headers=ADMIN)).json()
    assert plan["windows"] == {"day": 100}
    c1 = (await client.get("/v1/admin/consumers/c1", headers=ADMIN)).json()
    assert (c1["status"], c1["balance"]) == ("active", 1_000)
    assert (await client.get("/v1/admin/consumers/c3", headers=ADMIN)).status_code == 404
    assert (await client.get("/v1/admin/consumers/c2", headers=ADMIN)).status_code == 200
    assert (await client.get("/v1/admin/consumers/c1/keys", headers=ADMIN)).json()["keys"] == []
    assert len((await client.get("/v1/admin/tokens", headers=ADMIN)).json()["items"]) == 4

    # billing: tops up (exactly, under concurrency) and suspends; mints nothing, plans nothing
    answers = await asyncio.gather(
        *(client.post("/v1/admin/consumers/c1/topup", json={"amount": 7}, headers=billing) for _ in range(50))
    )
    assert [a.status_code for a in answers] == [200] * 50
    assert await balance(client, "c1") == 1_000 + 50 * 7
    assert (await client.post("/v1/admin/consumers/c2/suspend", json={}, headers=billing)).status_code == 200
    assert (await client.get("/v1/admin/consumers/c2", headers=ADMIN)).json()["status"] == "suspended"
    refused = await client.post("/v1/admin/tokens", json={"role": "viewer", "name": "x"}, headers=billing)
    assert refused.status_code == 403
    assert (await client.put("/v1/admin/plans/p2", json={}, headers=billing)).status_code == 403

    # developer: its own consumer only; the other is "not found", plans are not its business
    listed = (await client.get("/v1/admin/consumers", headers=developer)).json()
    assert [c["id"] for c in listed["items"]] == ["c1"]
    assert (await client.get("/v1/admin/consumers/c1", headers=developer)).status_code == 200
    other = await client.get("/v1/admin/consumers/c2", headers=developer)
    assert (other.status_code, other.json()["error"]["code"]) == (404, "consumer_not_found")
    notices = await client.get("/v1/admin/consumers/c2/wallet-notices", headers=developer)
    assert notices.status_code == 404
    assert (await client.get("/v1/admin/plans", headers=developer)).status_code == 403

    # gateway: none of the admin API
    assert (await client.get("/v1/admin/consumers", headers=gateway)).status_code == 403


async def test_a_tenant_token_never_sees_another_tenant(client: httpx.AsyncClient) -> None:
    await seed(client, windows={"day": 100}, consumer_id="a1", balance=500)
    await seed(client, windows={"day": 100}, consumer_id="b1", balance=500, tenant="other")
    admin_a = bearer(await mint(client, "admin"))
    viewer_b = bearer(await mint(client, "viewer", tenant="other"))
    for path in (
        "/v1/admin/consumers/b1?tenant=other",
        "/v1/admin/consumers?tenant=other",
        "/v1/admin/plans/plan?tenant=other",
        "/v1/admin/tokens?tenant=other",
    ):
        response = await client.get(path, headers=admin_a)
        assert (response.status_code, response.json()["error"]["code"]) == (404, "tenant_not_found"), path
    writes = [
        ("/v1/admin/consumers/b1/topup", {"amount": 5, "tenant": "other"}),
        ("/v1/admin/consumers/b1/suspend", {"tenant": "other"}),
        ("/v1/admin/tokens", {"role": "admin", "name": "x", "tenant": "other"}),
    ]
    for path, body in writes:
        assert (await client.post(path, json=body, headers=admin_a)).status_code == 404, path
    put = await client.put(
        "/v1/admin/consumers/b2", json={"plan_id": "plan", "tenant": "other"}, headers=admin_a
    )
    assert put.status_code == 404
    assert await balance(client, "b1", "other") == 500
    b1 = (await client.get("/v1/admin/consumers/b1?tenant=other", headers=ADMIN)).json()
    assert b1["status"] == "active"
    assert (await client.get("/v1/admin/consumers/b2?tenant=other", headers=ADMIN)).status_code == 404
    assert len((await client.get("/v1/admin/tokens?tenant=other", headers=ADMIN)).json()["items"]) == 1
    # ... and the other way round; the bootstrap admin token sees both
    assert (await client.get("/v1/admin/consumers/b1?tenant=other", headers=viewer_b)).status_code == 200
    assert (await client.get("/v1/admin/consumers/a1", headers=viewer_b)).status_code == 404
    assert (await client.get("/v1/admin/consumers/a1", headers=admin_a)).status_code == 200


async def test_revoked_rotated_and_expired_tokens(client: httpx.AsyncClient) -> None:
    await seed(client, consumer_id="c1")
    admin = bearer(await mint(client, "admin"))
    raw = await mint(client, "viewer", headers=admin)
    token_id = raw.split("_")[1]
    assert (await client.get("/v1/admin/consumers", headers=bearer(raw))).status_code == 200

    # rotation: the new secret works at once, the old one for the grace period only
    rotated = await client.post(
        f"/v1/admin/tokens/{token_id}/rotate", json={"grace_seconds": 60}, headers=admin
    )
    assert rotated.status_code == 200, rotated.text
    new = rotated.json()["token"]
    assert new != raw and new.startswith(f"aft_{token_id}_")
    for token in (raw, new):
        assert (await client.get("/v1/admin/consumers", headers=bearer(token))).status_code == 200
    again = await client.post(f"/v1/admin/tokens/{token_id}/rotate", json={"grace_seconds": 0}, headers=admin)
    newest = again.json()["token"]
    for token, status in ((raw, 401), (new, 401), (newest, 200)):
        assert (await client.get("/v1/admin/consumers", headers=bearer(token))).status_code == status

    # revocation: refused on its very next call, kept in the list as revoked
    revoked = await client.delete(f"/v1/admin/tokens/{token_id}", headers=admin)
    assert revoked.status_code == 200 and revoked.json()["revoked_at_ms"] is not None
    refused = await client.get("/v1/admin/consumers", headers=bearer(newest))
    assert (refused.status_code, refused.json()["error"]["code"]) == (401, "unauthorized")
    listed = (await client.get("/v1/admin/tokens", headers=admin)).json()["items"]
    assert {t["id"]: t["revoked_at_ms"] is not None for t in listed}[token_id] is True
    stale = await client.post(f"/v1/admin/tokens/{token_id}/rotate", json={}, headers=admin)
    assert stale.status_code == 404  # a revoked token is not brought back by a rotation

    # expiry
    short = await mint(client, "viewer", headers=admin, expires_in_seconds=1)
    assert (await client.get("/v1/admin/consumers", headers=bearer(short))).status_code == 200
    await asyncio.sleep(1.1)
    assert (await client.get("/v1/admin/consumers", headers=bearer(short))).status_code == 401

    # a token's secret with another id, or a forged shape, is not a token
    forged = f"aft_{'0' * 16}_{newest.split('_', 2)[2]}"
    assert (await client.get("/v1/admin/consumers", headers=bearer(forged))).status_code == 401
    assert (await client.get("/v1/admin/consumers", headers=bearer("aft_short"))).status_code == 401


async def test_a_token_another_tenant_holds_or_none_holds_is_not_found(client: httpx.AsyncClient) -> None:
    admin = bearer(await mint(client, "admin"))
    theirs = (await mint(client, "viewer", tenant="other")).split("_")[1]
    for token_id in (theirs, "0123456789abcdef"):
        for method, path in (("GET", ""), ("DELETE", ""), ("POST", "/rotate")):
            response = await client.request(
                method, f"/v1/admin/tokens/{token_id}{path}", json={}, headers=admin
            )
            assert (response.status_code, response.json()["error"]["code"]) == (404, "token_not_found"), path
    # The other tenant's token is untouched (not revoked, not rotated).
    listed = (await client.get("/v1/admin/tokens?tenant=other", headers=ADMIN)).json()["items"]
    assert [(t["id"], t["revoked_at_ms"], t["previous_valid_until_ms"]) for t in listed] == [
        (theirs, None, None)
    ]
    bad = await client.get("/v1/admin/tokens/NOT-AN-ID", headers=admin)
    assert (bad.status_code, bad.json()["error"]["code"]) == (400, "invalid_identifier")


async def test_no_response_shows_a_secret_or_its_hash(client: httpx.AsyncClient) -> None:
    raw = await mint(client, "billing")
    token_id = raw.split("_")[1]
    secret = raw.split("_", 2)[2]
    for path in ("/v1/admin/tokens", f"/v1/admin/tokens/{token_id}"):
        text = (await client.get(path, headers=ADMIN)).text
        assert secret not in text and "hash" not in text
        assert token_id in text
    used = (await client.get(f"/v1/admin/tokens/{token_id}", headers=ADMIN)).json()["last_used_at_ms"]
    assert used is None
    assert (await client.get("/v1/admin/consumers", headers=bearer(raw))).status_code == 200
    used = (await client.get(f"/v1/admin/tokens/{token_id}", headers=ADMIN)).json()["last_used_at_ms"]
    assert isinstance(used, int) and used > 0


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        ({"role": "root", "name": "x"}, "invalid_role", "role"),
        ({"role": "developer", "name": "x"}, "invalid_request", "consumers"),
        ({"role": "viewer", "name": "x", "consumers": ["c1"]}, "invalid_request", "consumers"),
        ({"role": "viewer", "name": ""}, "invalid_request", "name"),
        ({"role": "viewer", "name": "x", "expires_in_seconds": 0}, "invalid_request", "expires_in_seconds"),
        ({"role": "viewer", "name": "x", "tenant": "no spaces"}, "invalid_identifier", "tenant"),
        ({"role": "viewer", "name": "x", "scopes": []}, "invalid_field", None),
        ({"role": "developer", "name": "x", "consumers": ["{bad}"]}, "invalid_identifier", "consumers"),
    ],
)
async def test_a_bad_token_request_is_refused_and_mints_nothing(
    client: httpx.AsyncClient, body: dict[str, Any], code: str, field: str | None
) -> None:
    response = await client.post("/v1/admin/tokens", json=body, headers=ADMIN)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == code
    assert response.json()["error"].get("field") == field
    assert (await client.get("/v1/admin/tokens", headers=ADMIN)).json()["items"] == []


async def test_failed_authentications_are_rate_limited_per_address(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    limit = settings.auth_failure_limit
    assert limit == 20  # the default
    good = bearer(await mint(client, "viewer"))
    wrong = bearer("aft_0123456789abcdef_" + "x" * 43)
    results = await asyncio.gather(*(client.get("/v1/admin/consumers", headers=wrong) for _ in range(limit)))
    assert [r.status_code for r in results] == [401] * limit
    # past the limit even a good token waits: the address is guessing
    blocked = await client.get("/v1/admin/consumers", headers=good)
    assert blocked.status_code == 429
    assert blocked.json()["error"]["code"] == "too_many_auth_failures"
    assert blocked.headers["retry-after"] == "60"
    metrics = (await client.get("/metrics")).text
    counts = {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(metrics)
        if family.name == "aforo_auth_failures"
        for sample in family.samples
        if sample.name == "aforo_auth_failures_total"
    }
    assert counts["invalid"] >= limit and counts["rate_limited"] >= 1


async def test_the_failed_authentication_limit_is_a_setting() -> None:
    app = create_app(make_settings(auth_failure_limit=3))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sidecar") as http:
        wrong = bearer("aft_0123456789abcdef_" + "x" * 43)
        statuses = [(await http.get("/v1/admin/consumers", headers=wrong)).status_code for _ in range(4)]
    assert statuses == [401, 401, 401, 429]


def test_the_roles_are_the_ones_the_readme_names() -> None:
    text = README.read_text()
    table = text[text.index("| role | may |") : text.index("A token of one tenant never sees another")]
    assert re.findall(r"^\| `([a-z]+)` \|", table, re.M) == [r.value for r in Role]
