"""What fuzzing the API (schemathesis, tests/test_openapi.py) and reading it turned up,
each pinned by a test: numbers that ``str.isdigit`` takes and ``int`` does not, NUL
characters Postgres cannot store, a suspension that made a revocation reversible, 405s
that did not name every method of their path. Each answers a clear 4xx and changes
nothing."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import ADMIN, seed
from tests.test_ingest import AUTH, ingest_client, ingest_settings  # noqa: F401 (fixtures)

JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize("path", ["/v1/admin/plans", "/v1/admin/consumers"])
@pytest.mark.parametrize("limit", ["\u00b2", "\u0663", "1\u00b2", "-1", "0"])
async def test_a_page_size_that_is_not_a_plain_number_is_a_400(
    client: httpx.AsyncClient, path: str, limit: str
) -> None:
    response = await client.get(path, params={"limit": limit}, headers=ADMIN)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["field"] == "limit"


async def test_a_kong_log_with_an_odd_number_is_refused_whole(ingest_client: httpx.AsyncClient) -> None:  # noqa: F811
    log = {"request": {"method": "GET"}, "response": {"status": "\u00b2"}, "started_at": 1}
    response = await ingest_client.post("/integrations/kong/ingest", json=[log], headers=AUTH)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_log"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/admin/plans/p1", {"name": "gold\u0000"}),
        ("/v1/admin/plans/p1", {"products": ["api\u0000"]}),
        ("/v1/admin/consumers/c1/suspend", {"reason": "why\u0000"}),
        ("/v1/admin/tokens", {"role": "viewer", "name": "n\u0000"}),
    ],
)
async def test_a_nul_character_in_an_admin_body_is_a_400_and_changes_nothing(
    client: httpx.AsyncClient, path: str, body: dict
) -> None:
    await seed(client, consumer_id="c1")
    method = client.put if path.startswith("/v1/admin/plans/") else client.post
    response = await method(
        path, content=json.dumps(body), headers={**ADMIN, "Content-Type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] in ("invalid_field", "invalid_identifier")
    assert (await client.get("/v1/admin/plans/p1", headers=ADMIN)).status_code == 404
    assert (await client.get("/v1/admin/consumers/c1", headers=ADMIN)).json()["status"] == "active"
    assert (await client.get("/v1/admin/tokens", headers=ADMIN)).json()["items"] == []
    # A backslash-u in a string's text (an escaped backslash) is no NUL.
    text = await client.put(
        "/v1/admin/plans/p2",
        content=r'{"name": "a\\u0000b"}',
        headers={**ADMIN, "Content-Type": "application/json"},
    )
    assert text.status_code == 201 and text.json()["name"] == "a\\u0000b"


@pytest.mark.parametrize(
    "ask",
    [
        {"consumer_id": "c1", "product": "api\u0000"},
        {"consumer_id": "c1", "product": "api\u001f"},
        {"consumer_id": "c1", "product": "api", "operation": "GET /x\u0000"},
    ],
)
async def test_control_characters_in_a_decision_are_a_400_and_count_nothing(
    client: httpx.AsyncClient, ask: dict
) -> None:
    await seed(client, consumer_id="c1", windows={"day": 10})
    # Sent as the raw bytes a gateway might send: the NUL escaped in JSON.
    response = await client.post(
        "/v1/authorize", content=json.dumps(ask), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert (await client.get("/v1/admin/consumers/c1", headers=ADMIN)).json()["windows"]["day"] == 0


async def test_a_revoked_consumer_is_neither_suspended_nor_resumed(client: httpx.AsyncClient) -> None:
    await seed(client, consumer_id="c1")
    assert (await client.post("/v1/admin/consumers/c1/revoke", json={}, headers=ADMIN)).status_code == 200
    for path in (
        "/v1/admin/consumers/c1/suspend",
        "/v1/admin/consumers/c1/resume",
        "/integrations/kong/suspend",
    ):
        body = {"consumer_id": "c1"} if path.startswith("/integrations") else {}
        refused = await client.post(path, json=body, headers=ADMIN)
        assert (refused.status_code, refused.json()["error"]["code"]) == (409, "consumer_revoked"), path
    assert (await client.get("/v1/admin/consumers/c1", headers=ADMIN)).json()["status"] == "revoked"
    decision = await client.post("/v1/authorize", json={"consumer_id": "c1", "product": "api"})
    assert decision.json()["reason"] == "revoked"


async def test_a_405_names_every_method_of_its_path(client: httpx.AsyncClient) -> None:
    for path, methods in [
        ("/v1/admin/tokens", {"GET", "POST"}),
        ("/v1/admin/plans/p1", {"GET", "PUT", "DELETE"}),
        ("/v1/admin/connections/c1", {"GET", "PUT", "DELETE"}),
        ("/integrations/konnect/connection", {"POST"}),  # not taken for one of the Konnect lists
    ]:
        response = await client.request(
            "PATCH" if path != "/integrations/konnect/connection" else "GET", path
        )
        assert response.status_code == 405, path
        assert set(response.headers["allow"].replace(" ", "").split(",")) - {"HEAD"} == methods, path
        assert response.json()["error"]["code"] == "method_not_allowed"
    unknown = await client.get("/integrations/konnect/widgets", headers=ADMIN)
    assert unknown.status_code == 404
