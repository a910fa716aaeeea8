"""The HTTP API as gateways and admins use it, over both stores.

Every refusal is checked twice: the answer (status, stable code, field) and the state
behind it (counters, balance, usage records, status, version), because a 4xx that still
changed something is worse than no check at all.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.config import Settings
from sidecar.core.clock import now_ms
from sidecar.core.windows import Window, window_bounds
from sidecar.http.app import create_app
from sidecar.store.base import Store
from sidecar.store.redis_store import RedisStore
from tests.conftest import ADMIN, ADMIN_TOKEN, DEPLOYMENTS, make_settings, seed

# --- helpers -----------------------------------------------------------------------

PRODUCT = "orders"
WALLET = 10_000_000  # 10.00 in micros
PRICE = 1_000
DAY_LIMIT = 100

BAD_AUTH = [
    pytest.param({}, id="missing"),
    pytest.param({"Authorization": "Bearer not-the-admin-token-0000"}, id="wrong-token"),
    pytest.param({"Authorization": f"Bearer {ADMIN_TOKEN}x"}, id="token-with-suffix"),
    pytest.param({"Authorization": f"Basic {ADMIN_TOKEN}"}, id="wrong-scheme"),
    pytest.param({"Authorization": ADMIN_TOKEN}, id="no-scheme"),
]


class Snapshot(NamedTuple):
    """Everything a decision or an admin call could change about one consumer."""

    view: dict[str, Any]  # GET /v1/admin/consumers/{id}: status, balance, pending, version, windows
    usage: list[tuple[str, int, int]]  # (request_id, cost, hits) of each usage record


async def authorize(client: httpx.AsyncClient, **body: Any) -> httpx.Response:
    """POST /v1/authorize for c1 on PRODUCT unless the body says otherwise."""
    payload: dict[str, Any] = {"product": PRODUCT}
    if "api_key" not in body:
        payload["consumer_id"] = "c1"
    payload.update(body)
    return await client.post("/v1/authorize", json=payload)


async def apigee(client: httpx.AsyncClient, **body: Any) -> httpx.Response:
    """POST /integrations/apigee/authorize (the seed contract) for c1 on PRODUCT."""
    payload: dict[str, Any] = {"appId": "c1", "apiProduct": PRODUCT, "operation": "GET /orders"}
    payload.update(body)
    return await client.post("/integrations/apigee/authorize", json=payload)


async def view(client: httpx.AsyncClient, consumer_id: str = "c1", tenant: str = "default") -> dict[str, Any]:
    response = await client.get(
        f"/v1/admin/consumers/{consumer_id}", params={"tenant": tenant}, headers=ADMIN
    )
    assert response.status_code == 200, response.text
    return response.json()


async def snapshot(client: httpx.AsyncClient, store: Store, consumer_id: str = "c1") -> Snapshot:
    records = await store.usage("default", consumer_id)
    return Snapshot(await view(client, consumer_id), [(r.request_id, r.cost, r.hits) for r in records])


async def redis_keys(store: Store) -> list[str]:
    """Every key under this test's prefix (empty for the memory store)."""
    if not isinstance(store, RedisStore):
        return []
    return [k.decode() async for k in store.client.scan_iter(match=f"{store.keys.prefix}*", count=1000)]


async def assert_no_consumer(store: Store, consumer_id: str, tenant: str = "default") -> None:
    """Nothing at all exists for this consumer: no state, no usage, no Redis key."""
    assert await store.get_consumer(tenant, consumer_id, now_ms()) is None
    assert await store.usage(tenant, consumer_id) == []
    assert [k for k in await redis_keys(store) if f"{{{tenant}:{consumer_id}}}" in k] == []


def assert_error(response: httpx.Response, status: int, code: str, field: str | None = None) -> None:
    """The machine-readable error envelope: {"error": {"code", "message", "field"?}}."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"]
    if field is not None:
        assert error.get("field") == field, error


def assert_unauthorized(response: httpx.Response, code: str = "unauthorized") -> None:
    assert_error(response, 401, code)
    assert response.headers["www-authenticate"].startswith("Bearer")


async def seed_c1(client: httpx.AsyncClient, **overrides: Any) -> None:
    """c1 on a plan with a daily quota, a price and a 10.00 prepaid wallet."""
    values: dict[str, Any] = {"windows": {"day": DAY_LIMIT}, "price": PRICE, "balance": WALLET}
    values.update(overrides)
    await seed(client, **values)


async def seed_c1_with_one_call(client: httpx.AsyncClient, store: Store) -> Snapshot:
    """Seeded c1 with one allowed call behind it (counters and usage not empty)."""
    await seed_c1(client)
    first = await authorize(client, request_id="first")
    assert first.status_code == 200, first.text
    state = await snapshot(client, store)
    assert state.view["windows"] == {"day": 1}
    assert state.view["balance"] == WALLET - PRICE
    assert state.usage == [("first", PRICE, 1)]
    return state


def clear_of_window_end(window: Window, margin_ms: int = 3_000) -> None:
    """Wait out the end of the current window if it is imminent, so the calls of one test
    land in the same period."""
    moment = now_ms()
    _, reset = window_bounds(window, moment)
    if reset - moment < margin_ms:
        time.sleep((reset - moment + 50) / 1000)


def metric(text: str, sample_name: str, labels: dict[str, str] | None = None) -> float:
    """The value of one sample in Prometheus exposition text (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == sample_name and (labels is None or sample.labels == labels):
                return sample.value
    return 0.0


# --- 1. admin authentication -----------------------------------------------------


@pytest.mark.parametrize("headers", BAD_AUTH)
async def test_plan_put_without_valid_token_is_refused_and_creates_nothing(
    client: httpx.AsyncClient, store: Store, headers: dict[str, str]
) -> None:
    """A refused PUT must not create the plan (auth is checked before the body is read)."""
    response = await client.put(
        "/v1/admin/plans/gold", json={"windows": {"day": 5}, "price": 10}, headers=headers
    )
    assert_unauthorized(response)
    assert_error(await client.get("/v1/admin/plans/gold", headers=ADMIN), 404, "plan_not_found")
    assert await store.get_plan("default", "gold") is None


@pytest.mark.parametrize("headers", BAD_AUTH)
async def test_topup_without_valid_token_leaves_the_balance(
    client: httpx.AsyncClient, store: Store, headers: dict[str, str]
) -> None:
    await seed_c1(client)
    before = await snapshot(client, store)
    response = await client.post("/v1/admin/consumers/c1/topup", json={"amount": 5_000_000}, headers=headers)
    assert_unauthorized(response)
    assert await snapshot(client, store) == before
    decision = (await authorize(client)).json()
    assert (decision["allow"], decision["balance"]) == (True, WALLET - PRICE)


@pytest.mark.parametrize("headers", BAD_AUTH)
async def test_suspend_without_valid_token_leaves_the_consumer_active(
    client: httpx.AsyncClient, store: Store, headers: dict[str, str]
) -> None:
    await seed_c1(client)
    before = await snapshot(client, store)
    response = await client.post("/v1/admin/consumers/c1/suspend", json={}, headers=headers)
    assert_unauthorized(response)
    after = await snapshot(client, store)
    assert after == before
    assert after.view["status"] == "active"
    decision = await authorize(client)
    assert (decision.status_code, decision.json()["reason"]) == (200, "ok")


ADMIN_CALLS = [
    pytest.param("PUT", "/v1/admin/plans/plan", {"windows": {"day": 1}, "price": 5}, id="plan-replace"),
    pytest.param(
        "PUT", "/v1/admin/consumers/c1", {"plan_id": "plan", "wallet_mode": "postpaid"}, id="rebind"
    ),
    pytest.param("PUT", "/v1/admin/consumers/c2", {"plan_id": "plan"}, id="consumer-create"),
    pytest.param("POST", "/v1/admin/consumers/c1/suspend", {}, id="suspend"),
    pytest.param("POST", "/v1/admin/consumers/c1/revoke", {}, id="revoke"),
    pytest.param("POST", "/v1/admin/consumers/c1/topup", {"amount": 1, "reference": "r"}, id="topup"),
    pytest.param("POST", "/v1/admin/consumers/c1/keys", {}, id="key-create"),
    pytest.param("DELETE", "/v1/admin/consumers/c1/keys/" + "0" * 64, None, id="key-revoke"),
    pytest.param("POST", "/integrations/kong/suspend", {"consumer_id": "c1"}, id="kong-suspend"),
    pytest.param(
        "POST", "/integrations/apigee/suspend", {"appId": "c1", "mode": "revoke"}, id="apigee-revoke"
    ),
    pytest.param("GET", "/v1/admin/consumers/c1", None, id="consumer-read"),
    pytest.param("GET", "/v1/admin/plans/plan", None, id="plan-read"),
]


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_CALLS)
async def test_every_admin_endpoint_refuses_a_wrong_token_and_changes_nothing(
    client: httpx.AsyncClient, store: Store, method: str, path: str, body: dict[str, Any] | None
) -> None:
    await seed_c1(client)
    before = await snapshot(client, store)
    plan_before = (await client.get("/v1/admin/plans/plan", headers=ADMIN)).json()
    keys_before = sorted(await redis_keys(store))
    wrong = {"Authorization": "Bearer not-the-admin-token-0000"}
    response = await client.request(method, path, json=body, headers=wrong)
    assert_unauthorized(response)
    assert "balance" not in response.text  # a read leaks nothing either
    assert await snapshot(client, store) == before
    assert (await client.get("/v1/admin/plans/plan", headers=ADMIN)).json() == plan_before
    await assert_no_consumer(store, "c2")
    assert sorted(await redis_keys(store)) == keys_before
    decision = (await authorize(client)).json()
    assert (decision["reason"], decision["balance"]) == ("ok", WALLET - PRICE)


async def test_admin_api_is_disabled_without_a_token(store: Store, settings: Settings) -> None:
    """No admin_token configured: every admin call answers 401 admin_disabled, even with
    the token the other apps accept; decisions keep working."""
    disabled = make_settings(admin_token=None, redis_url=settings.redis_url, key_prefix=settings.key_prefix)
    assert disabled.admin_token is None
    app = create_app(disabled, store)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://sidecar") as http:
        for headers in ({}, ADMIN):
            response = await http.put("/v1/admin/plans/plan", json={"windows": {"day": 5}}, headers=headers)
            assert_unauthorized(response, "admin_disabled")
            response = await http.post(
                "/integrations/kong/suspend", json={"consumer_id": "c1"}, headers=headers
            )
            assert_unauthorized(response, "admin_disabled")
        decision = await http.post("/v1/authorize", json={"consumer_id": "c1", "product": PRODUCT})
        assert (decision.status_code, decision.json()["reason"]) == (403, "unknown_consumer")
    assert await store.get_plan("default", "plan") is None
    await assert_no_consumer(store, "c1")


# --- 2. bad input on the decision endpoints ----------------------------------------

AUTHORIZE_BAD_INPUT = [
    pytest.param(b'{"consumer_id": "c1", "product": ', 400, "malformed_json", None, id="malformed-json"),
    pytest.param(b"", 400, "malformed_json", None, id="empty-body"),
    pytest.param(b'["c1", "orders"]', 400, "invalid_field", None, id="not-an-object"),
    pytest.param(
        {"consumer_id": "c1", "product": PRODUCT, "cost": "abc"}, 400, "invalid_field", "cost", id="cost-str"
    ),
    pytest.param(
        {"consumer_id": "c1", "product": PRODUCT, "cost": 1.5}, 400, "invalid_field", "cost", id="cost-float"
    ),
    pytest.param(
        {"consumer_id": "c1", "product": PRODUCT, "hits": "x"}, 400, "invalid_field", "hits", id="hits-str"
    ),
    pytest.param(
        {"consumer_id": 7, "product": PRODUCT}, 400, "invalid_field", "consumer_id", id="consumer-int"
    ),
    pytest.param(
        {"consumer_id": "c1", "product": PRODUCT, "charge": 5}, 400, "invalid_field", None, id="unknown-field"
    ),
    pytest.param(
        {"consumer_id": "c1", "product": PRODUCT, "cost": -1}, 400, "invalid_amount", "cost", id="cost-neg"
    ),
    pytest.param({"product": PRODUCT}, 400, "missing_consumer", "consumer_id", id="no-consumer"),
    pytest.param(
        {"consumer_id": "c1", "api_key": "ak_0123456789", "product": PRODUCT},
        400,
        "missing_consumer",
        "consumer_id",
        id="consumer-and-key",
    ),
    pytest.param({"consumer_id": "c1"}, 400, "invalid_field", None, id="no-product"),
    pytest.param(
        {"consumer_id": "c1", "product": PRODUCT, "hits": 0}, 400, "invalid_request", "hits", id="hits-0"
    ),
    pytest.param(
        {"consumer_id": "c1", "product": PRODUCT, "hits": 1_000_001},
        400,
        "invalid_request",
        "hits",
        id="hits-too-many",
    ),
    pytest.param(
        {"consumer_id": "c1", "product": PRODUCT, "cost": 2**53},
        400,
        "invalid_amount",
        "cost",
        id="cost-beyond-exact",
    ),
    pytest.param(
        {"consumer_id": "c{1}", "product": PRODUCT},
        400,
        "invalid_identifier",
        "consumer_id",
        id="consumer-braces",
    ),
    pytest.param(
        {"consumer_id": "c 1", "product": PRODUCT},
        400,
        "invalid_identifier",
        "consumer_id",
        id="consumer-space",
    ),
    pytest.param(
        {"consumer_id": "c1", "product": PRODUCT, "tenant": "a:b"},
        400,
        "invalid_identifier",
        "tenant",
        id="tenant",
    ),
    pytest.param({"consumer_id": "c1", "product": "a|b"}, 400, "invalid_identifier", "product", id="product"),
]

APIGEE_BAD_INPUT = [
    pytest.param(b'{"appId": "c1", "apiProduct"', 400, "malformed_json", None, id="malformed-json"),
    pytest.param(b"", 400, "malformed_json", None, id="empty-body"),
    pytest.param(
        {"appId": "c1", "apiProduct": PRODUCT, "estimatedCost": "abc"},
        400,
        "invalid_field",
        "estimatedCost",
        id="cost-str",
    ),
    pytest.param({"appId": 7, "apiProduct": PRODUCT}, 400, "invalid_field", "appId", id="appid-int"),
    pytest.param({"apiProduct": PRODUCT}, 400, "invalid_field", None, id="no-appid"),
    pytest.param(
        {"appId": "c1", "apiProduct": PRODUCT, "charge": 5}, 400, "invalid_field", None, id="unknown-field"
    ),
    pytest.param(
        {"appId": "c1", "apiProduct": PRODUCT, "estimatedCost": 0.0000001},
        400,
        "invalid_amount",
        "estimatedCost",
        id="cost-7-decimals",
    ),
    pytest.param(
        {"appId": "c1", "apiProduct": PRODUCT, "estimatedCost": -0.05},
        400,
        "invalid_amount",
        "estimatedCost",
        id="cost-neg",
    ),
    pytest.param(
        {"appId": "c1", "apiProduct": PRODUCT, "estimatedCost": "NaN"},
        400,
        "invalid_amount",
        "estimatedCost",
        id="cost-nan",
    ),
    pytest.param(
        {"appId": "c1", "apiProduct": PRODUCT, "estimatedCost": 10_000_000_000},
        400,
        "invalid_amount",
        "estimatedCost",
        id="cost-beyond-exact",
    ),
    pytest.param(
        {"appId": "c{1}", "apiProduct": PRODUCT}, 400, "invalid_identifier", "appId", id="appid-braces"
    ),
    pytest.param(
        {"appId": "c1", "apiProduct": PRODUCT, "tenant": "a:b"},
        400,
        "invalid_identifier",
        "tenant",
        id="tenant",
    ),
]


async def _post_bad(client: httpx.AsyncClient, path: str, body: bytes | dict[str, Any]) -> httpx.Response:
    if isinstance(body, bytes):
        return await client.post(path, content=body, headers={"content-type": "application/json"})
    return await client.post(path, json=body)


@pytest.mark.parametrize(("body", "status", "code", "field"), AUTHORIZE_BAD_INPUT)
async def test_authorize_bad_input_is_refused_and_changes_nothing(
    client: httpx.AsyncClient,
    store: Store,
    body: bytes | dict[str, Any],
    status: int,
    code: str,
    field: str | None,
) -> None:
    before = await seed_c1_with_one_call(client, store)
    assert_error(await _post_bad(client, "/v1/authorize", body), status, code, field)
    assert await snapshot(client, store) == before


@pytest.mark.parametrize(("body", "status", "code", "field"), APIGEE_BAD_INPUT)
async def test_apigee_bad_input_is_refused_and_changes_nothing(
    client: httpx.AsyncClient,
    store: Store,
    body: bytes | dict[str, Any],
    status: int,
    code: str,
    field: str | None,
) -> None:
    before = await seed_c1_with_one_call(client, store)
    assert_error(await _post_bad(client, "/integrations/apigee/authorize", body), status, code, field)
    assert await snapshot(client, store) == before


def _oversized(settings: Settings, endpoint: str) -> bytes:
    """A VALID request padded past max_body_bytes: if the limit were not enforced it
    would be allowed and charged."""
    if endpoint == "/v1/authorize":
        valid = b'{"consumer_id": "c1", "product": "orders", "request_id": "big"'
    else:
        valid = b'{"appId": "c1", "apiProduct": "orders", "requestId": "big"'
    return valid + b" " * settings.max_body_bytes + b"}"


async def _chunks(data: bytes, size: int = 4096) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


@pytest.mark.parametrize("endpoint", ["/v1/authorize", "/integrations/apigee/authorize"])
@pytest.mark.parametrize("announced", [True, False], ids=["content-length", "streamed"])
async def test_oversized_body_is_refused_with_413(
    client: httpx.AsyncClient, store: Store, settings: Settings, endpoint: str, announced: bool
) -> None:
    before = await seed_c1_with_one_call(client, store)
    data = _oversized(settings, endpoint)
    headers = {"content-type": "application/json"}
    if announced:
        response = await client.post(endpoint, content=data, headers=headers)
    else:
        response = await client.post(endpoint, content=_chunks(data), headers=headers)
    sent = response.request.headers
    assert ("content-length" in sent) is announced
    assert_error(response, 413, "body_too_large")
    assert await snapshot(client, store) == before


@pytest.mark.parametrize("endpoint", ["/v1/authorize", "/integrations/apigee/authorize"])
async def test_unknown_consumer_is_denied_and_nothing_is_created(
    client: httpx.AsyncClient, store: Store, endpoint: str
) -> None:
    before = await seed_c1_with_one_call(client, store)
    if endpoint == "/v1/authorize":
        response = await authorize(client, consumer_id="ghost", request_id="ghost-1", cost=5)
        body = response.json()
        assert (body["allow"], body["reason"], body["status"]) == (False, "unknown_consumer", 403)
        assert (body["consumer_id"], body["balance"], body["charged"]) == ("ghost", None, 0)
    else:
        response = await apigee(client, appId="ghost", requestId="ghost-1", estimatedCost=0.05)
        body = response.json()
        assert (body["allow"], body["reason"], body["status"]) == (False, "unknown_consumer", 403)
        assert body["remainingBalance"] is None
    assert response.status_code == 403
    assert_error(await client.get("/v1/admin/consumers/ghost", headers=ADMIN), 404, "consumer_not_found")
    await assert_no_consumer(store, "ghost")
    assert await snapshot(client, store) == before


# --- 2b. bad input on the admin API ------------------------------------------------


@pytest.mark.parametrize(
    ("plan", "code", "field"),
    [
        pytest.param(
            {"windows": {"fortnight": 5}}, "unknown_window", "windows.fortnight", id="unknown-window"
        ),
        pytest.param({"windows": {"day": -1}}, "invalid_limit", "windows.day", id="negative-limit"),
        pytest.param({"windows": {"day": 5}, "price": -1}, "invalid_amount", "price", id="negative-price"),
        # msgspec names a dict value's path "windows[...]": only the code is checked.
        pytest.param({"windows": {"day": "5"}}, "invalid_field", None, id="limit-str"),
        pytest.param(
            {"windows": {"day": 5}, "tenant": "a:b"}, "invalid_identifier", "tenant", id="tenant-colon"
        ),
        pytest.param({"products": ["a b"]}, "invalid_identifier", "products[]", id="product-space"),
        pytest.param({"windows": {"day": 5}, "quota": 3}, "invalid_field", None, id="unknown-field"),
    ],
)
async def test_invalid_plan_is_refused_and_not_created(
    client: httpx.AsyncClient, store: Store, plan: dict[str, Any], code: str, field: str | None
) -> None:
    assert_error(await client.put("/v1/admin/plans/gold", json=plan, headers=ADMIN), 400, code, field)
    assert_error(await client.get("/v1/admin/plans/gold", headers=ADMIN), 404, "plan_not_found")
    for tenant in ("default", "a:b"):
        assert await store.get_plan(tenant, "gold") is None
    assert await redis_keys(store) == []


async def test_invalid_plan_update_leaves_the_old_plan(client: httpx.AsyncClient, store: Store) -> None:
    before = await seed_c1_with_one_call(client, store)
    plan_before = (await client.get("/v1/admin/plans/plan", headers=ADMIN)).json()
    bad = {"windows": {"day": 1, "fortnight": 1}, "price": 0}
    assert_error(await client.put("/v1/admin/plans/plan", json=bad, headers=ADMIN), 400, "unknown_window")
    assert (await client.get("/v1/admin/plans/plan", headers=ADMIN)).json() == plan_before
    assert await snapshot(client, store) == before
    decision = (await authorize(client)).json()
    assert (decision["reason"], decision["charged"]) == ("ok", PRICE)


@pytest.mark.parametrize("consumer_id", ["c{1}", "c 1", "{default:c1}"])
async def test_consumer_id_with_braces_or_spaces_is_refused(
    client: httpx.AsyncClient, store: Store, consumer_id: str
) -> None:
    await seed(client, consumer_id="other")
    response = await client.put(f"/v1/admin/consumers/{consumer_id}", json={"plan_id": "plan"}, headers=ADMIN)
    assert_error(response, 400, "invalid_identifier", "id")
    await assert_no_consumer(store, consumer_id)
    assert [k for k in await redis_keys(store) if consumer_id in k] == []


@pytest.mark.parametrize("encoded", ["%2E", "%2E%2E", "%2e%2e"])
async def test_dot_segments_are_not_consumer_ids(
    client: httpx.AsyncClient, store: Store, encoded: str
) -> None:
    """ "." and ".." would be resolved away as URL path segments: no plain admin URL
    could name such a consumer, so they are refused wherever a consumer id is taken."""
    await seed(client, consumer_id="other")
    response = await client.put(f"/v1/admin/consumers/{encoded}", json={"plan_id": "plan"}, headers=ADMIN)
    assert_error(response, 400, "invalid_identifier", "id")
    assert "not '.' or '..'" in response.json()["error"]["message"]
    name = encoded.replace("%2E", ".").replace("%2e", ".")
    body = await client.post("/v1/authorize", json={"consumer_id": name, "product": "p"})
    assert_error(body, 400, "invalid_identifier", "consumer_id")
    await assert_no_consumer(store, name)


async def test_consumer_with_a_bad_tenant_is_refused(client: httpx.AsyncClient, store: Store) -> None:
    await seed(client, consumer_id="other")
    body = {"plan_id": "plan", "tenant": "acme:eu"}
    response = await client.put("/v1/admin/consumers/c1", json=body, headers=ADMIN)
    assert_error(response, 400, "invalid_identifier", "tenant")
    await assert_no_consumer(store, "c1")
    await assert_no_consumer(store, "c1", tenant="acme:eu")


async def test_consumer_on_a_missing_plan_is_refused_and_not_created(
    client: httpx.AsyncClient, store: Store
) -> None:
    response = await client.put("/v1/admin/consumers/c1", json={"plan_id": "nope"}, headers=ADMIN)
    assert_error(response, 404, "plan_not_found")
    assert_error(await client.get("/v1/admin/consumers/c1", headers=ADMIN), 404, "consumer_not_found")
    await assert_no_consumer(store, "c1")
    assert await redis_keys(store) == []  # not even the plan's member set
    decision = await authorize(client)
    assert (decision.status_code, decision.json()["reason"]) == (403, "unknown_consumer")


@pytest.mark.parametrize(
    ("amount", "code"),
    [(0, "invalid_amount"), (-5_000_000, "invalid_amount"), (1.5, "invalid_field"), ("10", "invalid_field")],
)
async def test_topup_of_a_non_positive_amount_is_refused(
    client: httpx.AsyncClient, store: Store, amount: Any, code: str
) -> None:
    before = await seed_c1_with_one_call(client, store)
    response = await client.post(
        "/v1/admin/consumers/c1/topup", json={"amount": amount, "reference": "t-1"}, headers=ADMIN
    )
    assert_error(response, 400, code, "amount")
    assert await snapshot(client, store) == before
    # The reference was not burnt by the refused call.
    ok = await client.post(
        "/v1/admin/consumers/c1/topup", json={"amount": 7, "reference": "t-1"}, headers=ADMIN
    )
    assert ok.json() == {"balance": WALLET - PRICE + 7, "applied": True}


async def test_topup_to_an_unknown_consumer_is_404(client: httpx.AsyncClient, store: Store) -> None:
    await seed_c1(client)
    response = await client.post(
        "/v1/admin/consumers/ghost/topup", json={"amount": 1_000_000, "reference": "g"}, headers=ADMIN
    )
    assert_error(response, 404, "consumer_not_found")
    await assert_no_consumer(store, "ghost")


# --- 3. suspension ------------------------------------------------------------------


class Channel(NamedTuple):
    suspend: tuple[str, dict[str, Any]]
    resume: tuple[str, dict[str, Any]]


CHANNELS = {
    "admin": Channel(
        ("/v1/admin/consumers/c1/suspend", {"reason": "abuse"}),
        ("/v1/admin/consumers/c1/resume", {}),
    ),
    "kong": Channel(
        ("/integrations/kong/suspend", {"consumer_id": "c1", "reason": "abuse"}),
        ("/integrations/kong/resume", {"consumer_id": "c1"}),
    ),
    "apigee": Channel(
        (
            "/integrations/apigee/suspend",
            {"appId": "c1", "developer": "dev@example.com", "mode": "suspend", "reason": "unpaid"},
        ),
        ("/integrations/apigee/resume", {"appId": "c1", "developer": "dev@example.com", "reason": "paid"}),
    ),
}


@pytest.mark.parametrize("channel", list(CHANNELS))
async def test_suspend_and_resume_take_effect_on_the_next_decision(
    client: httpx.AsyncClient, store: Store, settings: Settings, channel: str
) -> None:
    before = await seed_c1_with_one_call(client, store)
    path, body = CHANNELS[channel].suspend
    response = await client.post(path, json=body, headers=ADMIN)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "suspended"
    suspended = await snapshot(client, store)
    assert suspended.view["status"] == "suspended"
    for i in range(3):
        denied = await authorize(client, request_id=f"s-{i}", cost=5_000)
        assert denied.status_code == 403
        body_json = denied.json()
        assert (body_json["allow"], body_json["reason"], body_json["charged"]) == (False, "suspended", 0)
        assert body_json["ttl_seconds"] == settings.deny_ttl_seconds
        assert "retry-after" not in denied.headers
    via_apigee = await apigee(client, estimatedCost=1)
    assert (via_apigee.status_code, via_apigee.json()["reason"]) == (403, "suspended")
    # Suspended decisions consume no quota and no money, and record no usage.
    assert await snapshot(client, store) == suspended
    assert (suspended.view["windows"], suspended.view["balance"]) == (before.view["windows"], WALLET - PRICE)
    assert suspended.usage == before.usage

    path, body = CHANNELS[channel].resume
    response = await client.post(path, json=body, headers=ADMIN)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "active"
    allowed = await authorize(client, request_id="after")
    assert allowed.status_code == 200
    assert (allowed.json()["reason"], allowed.json()["balance"]) == ("ok", WALLET - 2 * PRICE)
    after = await snapshot(client, store)
    assert after.view["windows"] == {"day": 2}
    assert after.usage == [("first", PRICE, 1), ("after", PRICE, 1)]


async def test_apigee_revoke_mode_revokes(client: httpx.AsyncClient, store: Store) -> None:
    before = await seed_c1_with_one_call(client, store)
    body = {"appId": "c1", "developer": "dev@example.com", "mode": "revoke", "reason": "fraud"}
    response = await client.post("/integrations/apigee/suspend", json=body, headers=ADMIN)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "revoked"
    revoked = await snapshot(client, store)
    denied = await authorize(client)
    assert (denied.status_code, denied.json()["reason"], denied.json()["allow"]) == (403, "revoked", False)
    via_apigee = await apigee(client)
    assert (via_apigee.status_code, via_apigee.json()["reason"]) == (403, "revoked")
    assert await snapshot(client, store) == revoked
    assert (revoked.view["windows"], revoked.view["balance"], revoked.usage) == (
        before.view["windows"],
        before.view["balance"],
        before.usage,
    )


@pytest.mark.parametrize("mode", ["pause", "", "SUSPEND"])
async def test_apigee_unknown_mode_is_refused_and_changes_nothing(
    client: httpx.AsyncClient, store: Store, mode: str
) -> None:
    before = await seed_c1_with_one_call(client, store)
    body = {"appId": "c1", "developer": "dev@example.com", "mode": mode, "reason": "x"}
    response = await client.post("/integrations/apigee/suspend", json=body, headers=ADMIN)
    assert_error(response, 400, "invalid_request", "mode")
    assert await snapshot(client, store) == before
    decision = await authorize(client)
    assert (decision.status_code, decision.json()["reason"]) == (200, "ok")


@pytest.mark.parametrize("channel", list(CHANNELS))
async def test_suspending_an_unknown_consumer_is_404_and_creates_nothing(
    client: httpx.AsyncClient, store: Store, channel: str
) -> None:
    await seed_c1(client)
    path, body = CHANNELS[channel].suspend
    path = path.replace("c1", "ghost")
    body = {k: ("ghost" if v == "c1" else v) for k, v in body.items()}
    assert_error(await client.post(path, json=body, headers=ADMIN), 404, "consumer_not_found")
    await assert_no_consumer(store, "ghost")


async def test_rebinding_a_suspended_consumer_keeps_it_suspended(
    client: httpx.AsyncClient, store: Store
) -> None:
    """A consumer PUT that leaves status out must not resume the consumer by accident."""
    await seed_c1(client)
    await client.post("/v1/admin/consumers/c1/suspend", json={}, headers=ADMIN)
    await client.put("/v1/admin/plans/silver", json={"windows": {"day": 50}}, headers=ADMIN)
    rebound = await client.put("/v1/admin/consumers/c1", json={"plan_id": "silver"}, headers=ADMIN)
    assert rebound.status_code == 200, rebound.text
    assert (rebound.json()["status"], rebound.json()["plan_id"]) == ("suspended", "silver")
    denied = await authorize(client)
    assert (denied.status_code, denied.json()["reason"]) == (403, "suspended")
    assert await store.usage("default", "c1") == []


# --- 4. API keys -------------------------------------------------------------------


async def _new_key(client: httpx.AsyncClient, consumer_id: str = "c1") -> tuple[str, str]:
    response = await client.post(f"/v1/admin/consumers/{consumer_id}/keys", json={}, headers=ADMIN)
    assert response.status_code == 201, response.text
    body = response.json()
    raw, key_hash = body["api_key"], body["key_hash"]
    assert key_hash == hashlib.sha256(raw.encode()).hexdigest()
    assert body["consumer_id"] == consumer_id
    return raw, key_hash


async def test_api_key_lifecycle(client: httpx.AsyncClient, store: Store) -> None:
    await seed_c1(client)
    raw, key_hash = await _new_key(client)
    assert raw.startswith("ak_") and len(raw) >= 40

    allowed = await authorize(client, api_key=raw)
    assert allowed.status_code == 200
    assert (allowed.json()["allow"], allowed.json()["consumer_id"]) == (True, "c1")

    unknown = await authorize(client, api_key="ak_" + "x" * 43)
    assert unknown.status_code == 401
    assert (unknown.json()["allow"], unknown.json()["reason"]) == (False, "invalid_key")

    revoked = await client.delete(f"/v1/admin/consumers/c1/keys/{key_hash}", headers=ADMIN)
    assert revoked.status_code == 200
    assert revoked.json() == {"revoked": True, "key_hash": key_hash}
    refused = await authorize(client, api_key=raw)
    assert refused.status_code == 401
    assert (refused.json()["allow"], refused.json()["reason"]) == (False, "invalid_key")

    again = await client.delete(f"/v1/admin/consumers/c1/keys/{key_hash}", headers=ADMIN)
    assert_error(again, 404, "key_not_found")
    # Only the one allowed call was counted and charged.
    state = await snapshot(client, store)
    assert (state.view["windows"], state.view["balance"], len(state.usage)) == ({"day": 1}, WALLET - PRICE, 1)


async def test_a_key_names_only_its_own_consumer(client: httpx.AsyncClient, store: Store) -> None:
    """Revoking c1's key does not touch c2's, and each key debits its own consumer."""
    await seed_c1(client)
    await seed(client, consumer_id="c2", windows={"day": DAY_LIMIT}, price=PRICE, balance=WALLET)
    raw1, hash1 = await _new_key(client, "c1")
    raw2, _ = await _new_key(client, "c2")
    assert raw1 != raw2
    assert (await authorize(client, api_key=raw2)).json()["consumer_id"] == "c2"
    wrong_owner = await client.delete(f"/v1/admin/consumers/c2/keys/{hash1}", headers=ADMIN)
    assert_error(wrong_owner, 404, "key_not_found")
    assert (await authorize(client, api_key=raw1)).json()["consumer_id"] == "c1"
    assert (await view(client, "c1"))["balance"] == WALLET - PRICE
    assert (await view(client, "c2"))["balance"] == WALLET - PRICE


async def test_key_for_an_unknown_consumer_is_404_and_creates_nothing(
    client: httpx.AsyncClient, store: Store
) -> None:
    response = await client.post("/v1/admin/consumers/ghost/keys", json={}, headers=ADMIN)
    assert_error(response, 404, "consumer_not_found")
    assert "api_key" not in response.text
    await assert_no_consumer(store, "ghost")
    assert await redis_keys(store) == []  # not even a lookup entry


async def test_a_key_is_valid_only_in_its_tenant(client: httpx.AsyncClient) -> None:
    await seed_c1(client)
    await seed(
        client, consumer_id="c1", tenant="acme", windows={"day": DAY_LIMIT}, price=PRICE, balance=WALLET
    )
    raw, _ = await _new_key(client)  # a key of default:c1
    elsewhere = await authorize(client, api_key=raw, tenant="acme")
    assert (elsewhere.status_code, elsewhere.json()["reason"]) == (401, "invalid_key")
    assert (await view(client, "c1", tenant="acme"))["balance"] == WALLET
    home = await authorize(client, api_key=raw)
    assert (home.status_code, home.json()["tenant"], home.json()["consumer_id"]) == (200, "default", "c1")


@pytest.mark.parametrize("backend", DEPLOYMENTS)
async def test_raw_api_key_is_never_stored_in_redis(client: httpx.AsyncClient, store: Store) -> None:
    assert isinstance(store, RedisStore)
    await seed_c1(client)
    raw, key_hash = await _new_key(client)
    secret = raw.removeprefix("ak_")
    decision = await authorize(client, api_key=raw, request_id="keyed-1", operation="GET /orders")
    assert decision.status_code == 200
    redis = store.client
    names = await redis_keys(store)
    seen_hash = False
    for name in names:
        assert secret not in name
        kind = (await redis.type(name)).decode()
        if kind == "hash":
            items = await redis.hgetall(name)
            values = [*items.keys(), *items.values()]
        elif kind == "string":
            values = [await redis.get(name)]
        elif kind == "stream":
            values = [v for _, fields in await redis.xrange(name) for pair in fields.items() for v in pair]
        elif kind == "set":
            values = list(await redis.smembers(name))
        elif kind == "zset":
            values = list(await redis.zrange(name, 0, -1))
        else:
            pytest.fail(f"unexpected key type {kind} at {name}")
        for value in values:
            assert secret.encode() not in value, name
        seen_hash = seen_hash or key_hash in name or any(key_hash.encode() in v for v in values)
    assert seen_hash, "the key hash should be stored (else this scan proves nothing)"


# --- 5. the Apigee seed contract ----------------------------------------------------


async def test_apigee_remaining_balance_is_exact(client: httpx.AsyncClient, store: Store) -> None:
    await seed_c1(client, price=0)
    response = await apigee(client, estimatedCost=0.05)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["allow"], body["reason"], body["ttl_seconds"], body["status"]) == (True, "ok", 0, 200)
    assert '"remainingBalance":9.95' in response.text  # a JSON number, not a string
    assert body["remainingBalance"] == 9.95
    assert "retry-after" not in response.headers
    second = await apigee(client, estimatedCost="0.000001")
    assert '"remainingBalance":9.949999' in second.text
    state = await snapshot(client, store)
    assert state.view["balance"] == WALLET - 50_000 - 1
    assert [(cost, hits) for _, cost, hits in state.usage] == [(50_000, 1), (1, 1)]
    records = await store.usage("default", "c1")
    assert (records[0].product, records[0].operation) == (PRODUCT, "GET /orders")


async def test_apigee_whole_balance_is_a_plain_number(client: httpx.AsyncClient) -> None:
    await seed_c1(client, price=0)
    response = await apigee(client, estimatedCost=2)
    assert '"remainingBalance":8,' in response.text or '"remainingBalance":8}' in response.text


async def _apigee_denial(client: httpx.AsyncClient, kind: str) -> httpx.Response:
    """Bring c1 into the state that makes the next Apigee call denied for ``kind``."""
    if kind == "insufficient_balance":
        await seed_c1(client, price=0, balance=10_000)
        return await apigee(client, estimatedCost=0.05)
    if kind == "quota_exceeded":
        await seed_c1(client, windows={"day": 1}, price=0)
        assert (await apigee(client)).status_code == 200
        return await apigee(client)
    if kind == "product_not_allowed":
        await seed_c1(client, products=["billing"])
        return await apigee(client)
    if kind == "suspended":
        await seed_c1(client)
        await client.post("/v1/admin/consumers/c1/suspend", json={}, headers=ADMIN)
        return await apigee(client)
    assert kind == "unknown_consumer"
    await seed_c1(client)
    return await apigee(client, appId="ghost")


@pytest.mark.parametrize(
    ("kind", "status"),
    [
        ("insufficient_balance", 402),
        ("quota_exceeded", 429),
        ("product_not_allowed", 403),
        ("suspended", 403),
        ("unknown_consumer", 403),
    ],
)
async def test_apigee_denials_mirror_the_decision(
    client: httpx.AsyncClient, store: Store, settings: Settings, kind: str, status: int
) -> None:
    clear_of_window_end(Window.DAY)
    response = await _apigee_denial(client, kind)
    body = response.json()
    assert response.status_code == status
    assert (body["allow"], body["reason"], body["status"]) == (False, kind, status)
    if status == 429:
        retry_after = int(response.headers["retry-after"])
        assert retry_after >= 1
        assert body["retryAfter"] == retry_after
        assert body["ttl_seconds"] == min(retry_after, settings.quota_ttl_cap_seconds) > 0
    else:
        assert "retry-after" not in response.headers
        assert body["retryAfter"] is None
        assert body["ttl_seconds"] == settings.deny_ttl_seconds
    if kind == "insufficient_balance":
        assert '"remainingBalance":0.01' in response.text
    if kind != "unknown_consumer":
        # The denial consumed nothing beyond what set the state up.
        records = await store.usage("default", "c1")
        assert len(records) == (1 if kind == "quota_exceeded" else 0)


# --- 6. plans and wallets -----------------------------------------------------------


async def test_product_list_restricts_products(client: httpx.AsyncClient, store: Store) -> None:
    await seed_c1(client, products=[PRODUCT, "billing"])
    before = await snapshot(client, store)
    denied = await authorize(client, product="admin", cost=5)
    assert denied.status_code == 403
    assert (denied.json()["reason"], denied.json()["charged"]) == ("product_not_allowed", 0)
    assert await snapshot(client, store) == before
    for product in (PRODUCT, "billing"):
        allowed = await authorize(client, product=product)
        assert (allowed.status_code, allowed.json()["reason"]) == (200, "ok")
    state = await snapshot(client, store)
    assert (state.view["windows"], state.view["balance"]) == ({"day": 2}, WALLET - 2 * PRICE)


async def test_plan_update_applies_to_bound_consumers_on_the_next_decision(
    client: httpx.AsyncClient, store: Store
) -> None:
    clear_of_window_end(Window.DAY)
    await seed_c1(client, windows={"day": 5})
    await seed(client, consumer_id="c2", windows={"day": 5}, price=PRICE, balance=WALLET)
    for _ in range(2):
        assert (await authorize(client)).status_code == 200

    lower = {"windows": {"day": 2}, "price": 3 * PRICE}
    response = await client.put("/v1/admin/plans/plan", json=lower, headers=ADMIN)
    assert response.status_code == 200  # replaced, not created
    assert (await client.get("/v1/admin/plans/plan", headers=ADMIN)).json()["windows"] == {"day": 2}

    denied = await authorize(client)
    assert denied.status_code == 429
    assert denied.json()["reason"] == "quota_exceeded"
    assert denied.json()["windows"][0]["limit"] == 2
    assert denied.json()["windows"][0]["remaining"] == 0
    c2 = [(await authorize(client, consumer_id="c2")).json() for _ in range(3)]
    assert [d["reason"] for d in c2] == ["ok", "ok", "quota_exceeded"]
    assert [d["charged"] for d in c2] == [3 * PRICE, 3 * PRICE, 0]  # the new price too
    assert [d["windows"][0]["remaining"] for d in c2] == [1, 0, 0]

    higher = {"windows": {"day": 3}, "price": PRICE}
    assert (await client.put("/v1/admin/plans/plan", json=higher, headers=ADMIN)).status_code == 200
    allowed = await authorize(client)
    assert (allowed.status_code, allowed.json()["windows"][0]["remaining"]) == (200, 0)
    assert (await view(client, "c1"))["windows"] == {"day": 3}
    assert (await view(client, "c1"))["balance"] == WALLET - 3 * PRICE
    assert (await view(client, "c2"))["balance"] == WALLET - 6 * PRICE


async def test_plan_update_spares_consumers_that_moved_to_another_plan(
    client: httpx.AsyncClient, store: Store
) -> None:
    clear_of_window_end(Window.DAY)
    await seed_c1(client, windows={"day": 5})
    await client.put("/v1/admin/plans/silver", json={"windows": {"day": 4}, "price": 7}, headers=ADMIN)
    moved = await client.put("/v1/admin/consumers/c1", json={"plan_id": "silver"}, headers=ADMIN)
    assert moved.status_code == 200, moved.text
    await client.put("/v1/admin/plans/plan", json={"windows": {"day": 0}, "price": 99}, headers=ADMIN)
    decisions = [(await authorize(client)).json() for _ in range(5)]
    assert [d["reason"] for d in decisions] == ["ok"] * 4 + ["quota_exceeded"]
    assert [d["charged"] for d in decisions] == [7] * 4 + [0]


async def test_postpaid_wallet_is_never_refused_for_money(client: httpx.AsyncClient, store: Store) -> None:
    await seed_c1(client, wallet_mode="postpaid", price=300_000, balance=0)
    await seed(client, consumer_id="c2", price=300_000)  # the same plan, prepaid, empty
    balances = []
    for _ in range(4):
        decision = await authorize(client)
        assert decision.status_code == 200
        balances.append(decision.json()["balance"])
    assert balances == [-300_000, -600_000, -900_000, -1_200_000]
    big = await authorize(client, cost=7_654_321)
    assert (big.status_code, big.json()["balance"]) == (200, -8_854_321)
    state = await view(client)
    assert (state["wallet_mode"], state["balance"], state["pending"]) == ("postpaid", -8_854_321, 8_854_321)

    prepaid = await authorize(client, consumer_id="c2")
    assert prepaid.status_code == 402
    assert (prepaid.json()["reason"], prepaid.json()["balance"]) == ("insufficient_balance", 0)
    assert await store.usage("default", "c2") == []


async def test_topup_with_a_reference_is_applied_once(client: httpx.AsyncClient, store: Store) -> None:
    await seed_c1(client, balance=0)
    topup = "/v1/admin/consumers/c1/topup"
    first = await client.post(topup, json={"amount": 5_000_000, "reference": "inv-1"}, headers=ADMIN)
    assert first.json() == {"balance": 5_000_000, "applied": True}
    version = (await view(client))["version"]
    again = await client.post(topup, json={"amount": 5_000_000, "reference": "inv-1"}, headers=ADMIN)
    assert (again.status_code, again.json()) == (200, {"balance": 5_000_000, "applied": False})
    assert (await view(client))["version"] == version
    other = await client.post(topup, json={"amount": 2_000_000, "reference": "inv-2"}, headers=ADMIN)
    assert other.json() == {"balance": 7_000_000, "applied": True}
    for expected in (7_500_000, 8_000_000):  # no reference: every call is a new credit
        plain = await client.post(topup, json={"amount": 500_000}, headers=ADMIN)
        assert plain.json() == {"balance": expected, "applied": True}
    decision = await authorize(client)
    assert decision.json()["balance"] == 8_000_000 - PRICE
    assert (await view(client))["balance"] == 8_000_000 - PRICE


# --- 7. probes and routing ----------------------------------------------------------


async def test_healthz_and_readyz(client: httpx.AsyncClient) -> None:
    health = await client.get("/healthz")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    ready = await client.get("/readyz")
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})


async def test_metrics_count_decisions_by_reason(client: httpx.AsyncClient) -> None:
    clear_of_window_end(Window.DAY)
    await seed_c1(client, windows={"day": 3})
    before = (await client.get("/metrics")).text
    for _ in range(5):
        await authorize(client)
    await authorize(client, consumer_id="ghost")
    response = await client.get("/metrics")
    assert response.status_code == 200
    after = response.text
    assert re.search(r'^aforo_decisions_total\{reason="ok"\} ', after, re.M)
    assert "aforo_decision_seconds" in after

    def delta(name: str, labels: dict[str, str] | None = None) -> float:
        return metric(after, name, labels) - metric(before, name, labels)

    assert delta("aforo_decisions_total", {"reason": "ok"}) == 3
    assert delta("aforo_decisions_total", {"reason": "quota_exceeded"}) == 2
    assert delta("aforo_decisions_total", {"reason": "unknown_consumer"}) == 1
    assert delta("aforo_decision_seconds_count") == 6


async def test_unknown_path_is_a_json_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/nothing-here")
    assert_error(response, 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [("GET", "/v1/authorize", "POST"), ("DELETE", "/healthz", "GET"), ("POST", "/v1/admin/plans/p", "PUT")],
)
async def test_wrong_method_is_a_json_405(
    client: httpx.AsyncClient, method: str, path: str, allowed: str
) -> None:
    response = await client.request(method, path, headers=ADMIN)
    assert_error(response, 405, "method_not_allowed")
    assert allowed in response.headers["allow"]


# --- 8. reuse of decisions: ttl_seconds and Retry-After ---------------------------

WINDOW_SECONDS = {Window.MINUTE: 60, Window.HOUR: 3_600, Window.DAY: 86_400}


@pytest.mark.parametrize("window", list(WINDOW_SECONDS), ids=lambda w: w.value)
async def test_quota_denial_carries_retry_after_and_a_ttl(
    client: httpx.AsyncClient, store: Store, settings: Settings, window: Window
) -> None:
    clear_of_window_end(window)
    await seed_c1(client, windows={window.value: 2})
    for _ in range(2):
        allowed = await authorize(client)
        assert allowed.status_code == 200
        assert (allowed.json()["ttl_seconds"], allowed.json()["retry_after"]) == (0, None)
        assert "retry-after" not in allowed.headers
    before = await snapshot(client, store)
    started = time.time()
    denied = await authorize(client)
    assert denied.status_code == 429
    body = denied.json()
    assert (body["allow"], body["reason"], body["charged"]) == (False, "quota_exceeded", 0)
    header = denied.headers["retry-after"]
    assert header.isdigit()
    retry_after = int(header)
    assert 1 <= retry_after <= WINDOW_SECONDS[window]
    assert body["retry_after"] == retry_after
    assert body["ttl_seconds"] == min(retry_after, settings.quota_ttl_cap_seconds)
    assert body["ttl_seconds"] > 0
    # Retry-After points at the window's reset.
    reset = body["windows"][0]["reset"]
    assert abs((reset - started) - retry_after) <= 2
    assert await snapshot(client, store) == before


async def test_other_denials_have_the_deny_ttl_and_no_retry_after(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    await seed_c1(client, balance=500)  # less than one call's price
    short = await authorize(client)
    assert short.status_code == 402
    assert (short.json()["reason"], short.json()["ttl_seconds"]) == (
        "insufficient_balance",
        settings.deny_ttl_seconds,
    )
    assert short.json()["retry_after"] is None
    assert "retry-after" not in short.headers
    ok = await authorize(client, cost=500)
    assert (ok.status_code, ok.json()["ttl_seconds"], ok.json()["balance"]) == (200, 0, 0)


async def test_a_revoked_consumer_is_not_resumed_but_can_be_reinstated(client):
    await seed(client, windows={"day": 10}, consumer_id="c1")
    assert (await client.post("/v1/admin/consumers/c1/revoke", json={}, headers=ADMIN)).status_code == 200
    for path, body in (
        ("/v1/admin/consumers/c1/resume", {}),
        ("/integrations/kong/resume", {"consumer_id": "c1"}),
        ("/integrations/apigee/resume", {"appId": "c1"}),
    ):
        response = await client.post(path, json=body, headers=ADMIN)
        assert (response.status_code, response.json()["error"]["code"]) == (409, "consumer_revoked")
    decision = await client.post("/v1/authorize", json={"consumer_id": "c1", "product": "p"})
    assert decision.json()["reason"] == "revoked"
    reinstated = await client.put(
        "/v1/admin/consumers/c1", json={"plan_id": "plan", "status": "active"}, headers=ADMIN
    )
    assert reinstated.json()["status"] == "active"
    assert (await client.post("/v1/authorize", json={"consumer_id": "c1", "product": "p"})).json()["allow"]
