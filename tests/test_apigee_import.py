"""Importing Apigee's catalog: the Management API client against a stub of the API run as
a real process (X's page tokens and Edge's startKey paging over 250+ objects,
Retry-After, a page failing mid-walk, 401, basic credentials), and the pure mapping of
products, apps, developers and credentials."""

from __future__ import annotations

import time
from typing import Any

import msgspec
import pytest

from sidecar.core.api_keys import hash_api_key
from sidecar.core.catalog_diff import Catalog, Removal, diff
from sidecar.core.models import ConsumerSpec, ConsumerStatus, Plan
from sidecar.integrations.apigee.management_client import ApigeeClient
from sidecar.integrations.apigee.mapping import (
    ApigeeMapping,
    ApigeeSnapshot,
    NoQuotaWindow,
    map_catalog,
    quota_fields,
)
from sidecar.integrations.gateway_http import GatewayError
from sidecar.integrations.plan_choice import PlanChoice
from tests.conftest import APIGEE_TOKEN as TOKEN
from tests.stubs import StubServer

# name -> (quota, interval, time unit, attributes)
PRODUCTS: dict[str, tuple[str, str, str, list[dict[str, str]]]] = {
    "gold": ("50", "1", "day", [{"name": "aforo:price", "value": "2000"}]),
    "silver": ("1000", "1", "hour", [{"name": "aforo:plan_id", "value": "silver-plan"}]),
    "bronze": ("5", "7", "day", []),
}
TIERS = list(PRODUCTS)


def app_key(i: int) -> str:
    return f"ck-app-{i:04d}-0123456789abcdef"


def apigee_catalog(apps: int = 250, developers: int = 25) -> dict[str, Any]:
    """``apps`` apps of ``developers`` developers, app i granted product TIERS[i % 3] by
    one approved credential; app 0 is also granted silver (the several-products rule)."""
    products = [
        {
            "name": name,
            "displayName": name.title(),
            "quota": quota,
            "quotaInterval": interval,
            "quotaTimeUnit": unit,
            "attributes": attributes,
            "environments": ["prod"],
        }
        for name, (quota, interval, unit, attributes) in PRODUCTS.items()
    ]
    people = [
        {"email": f"dev-{d:03d}@example.com", "developerId": f"d-{d:03d}", "status": "active"}
        for d in range(developers)
    ]
    listed = []
    for i in range(apps):
        grants = [{"apiproduct": TIERS[i % 3], "status": "approved"}]
        if i == 0:
            grants.append({"apiproduct": "silver", "status": "approved"})
        listed.append(
            {
                "appId": f"app-{i:04d}",
                "name": f"app-{i}",
                "status": "approved",
                "developerId": f"d-{i % developers:03d}",
                "credentials": [
                    {
                        "consumerKey": app_key(i),
                        "consumerSecret": "s",
                        "status": "approved",
                        "expiresAt": "-1",
                        "apiProducts": grants,
                    }
                ],
            }
        )
    return {"products": products, "developers": people, "apps": listed}


def _client(apigee: StubServer, **options: Any) -> ApigeeClient:
    options = {"token": TOKEN, "page_size": 100, "first_delay_s": 0.01} | options
    return ApigeeClient(f"{apigee.url}/v1", "acme", **options)


@pytest.mark.parametrize("api", ["x", "edge"])
async def test_every_page_is_read_once_with_page_tokens_on_x_and_start_keys_on_edge(apigee, api):
    apigee.faults(token=TOKEN, api=api)
    apigee.state(**apigee_catalog(apps=301, developers=250))
    client = _client(apigee, api=api)
    try:
        snapshot = await client.snapshot()
    finally:
        await client.aclose()
    assert sorted(a.appId for a in snapshot.apps) == [f"app-{i:04d}" for i in range(301)]
    assert len(snapshot.developers) == 250 and len({d.email for d in snapshot.developers}) == 250
    assert [p.name for p in snapshot.products] == sorted(PRODUCTS)
    app_calls = [c["query"] for c in apigee.calls() if c["path"] == "/apps"]
    if api == "x":
        assert [("pageToken" in q, q["pageSize"]) for q in app_calls] == [(False, "100")] + [
            (True, "100")
        ] * 3
    else:  # 100 a page, each after the first starting with the last key read
        assert [q.get("startKey") for q in app_calls] == [None, "app-0099", "app-0198", "app-0297"]
    developer_calls = [c["query"].get("startKey") for c in apigee.calls() if c["path"] == "/developers"]
    assert developer_calls == [None, "dev-099@example.com", "dev-198@example.com"]


async def test_a_page_failing_mid_walk_fails_the_walk_and_429_honours_retry_after(apigee):
    apigee.state(**apigee_catalog(apps=250))
    apigee.faults(
        token=TOKEN, faults=[{"path": "/apps", "page": 2, "status": 429, "retry_after": 1, "times": 1}]
    )
    client = _client(apigee)
    try:
        started = time.monotonic()
        assert len(await client.apps()) == 250
        assert time.monotonic() - started >= 0.9  # waited the Retry-After, not the 10 ms backoff
        apigee.faults(token=TOKEN, faults=[{"path": "/apps", "page": 3, "status": 503, "times": 100}])
        with pytest.raises(GatewayError) as failed:
            await client.snapshot()
        assert failed.value.code == "gateway_error"
    finally:
        await client.aclose()


async def test_wrong_credentials_and_an_unknown_organization_have_their_codes(apigee):
    bad = _client(apigee, token="ya29.wrong")
    unknown = ApigeeClient(f"{apigee.url}/v1", "nope", token=TOKEN, attempts=1)
    edge = _client(apigee, api="edge", token=None, username="ops@acme.example", password="edge-password-1")
    try:
        with pytest.raises(GatewayError) as refused:
            await bad.counts()
        assert (refused.value.code, refused.value.status) == ("unauthorized", 401)
        with pytest.raises(GatewayError) as missing:
            await unknown.organization()
        assert missing.value.code == "not_found"
        with pytest.raises(GatewayError):
            await edge.organization()  # basic credentials not accepted yet
        apigee.faults(token=None, api="edge", basic=["ops@acme.example", "edge-password-1"])
        assert (await edge.organization())["type"] == "paid"
    finally:
        for client in (bad, unknown, edge):
            await client.aclose()


async def test_set_quota_replaces_the_product_once_and_app_status_goes_through_the_developer(apigee):
    apigee.state(**apigee_catalog(apps=3))
    client = _client(apigee)
    fields = {"quota": "75", "quotaInterval": "1", "quotaTimeUnit": "hour"}
    try:
        assert await client.set_quota("gold", fields) == "updated"
        assert await client.set_quota("gold", fields) == "unchanged"
        assert await client.set_app_status("app-0001", approved=False) == "updated"
        assert await client.set_app_status("app-0001", approved=False) == "unchanged"
        with pytest.raises(GatewayError) as missing:
            await client.set_quota("platinum", fields)
        assert missing.value.code == "not_found"
    finally:
        await client.aclose()
    writes = [
        (c["method"], c["path"], c["query"], c["content_type"])
        for c in apigee.calls()
        if c["method"] != "GET"
    ]
    assert writes == [
        ("PUT", "/apiproducts/gold", {}, "application/json"),
        (
            "POST",
            "/developers/dev-001@example.com/apps/app-1",
            {"action": "revoke"},
            "application/octet-stream",
        ),
    ]
    put = next(c["body"] for c in apigee.calls() if c["method"] == "PUT")
    # The whole product is sent back: only the quota changed.
    assert put["attributes"] == [{"name": "aforo:price", "value": "2000"}] and put["environments"] == ["prod"]
    assert (put["quota"], put["quotaTimeUnit"]) == ("75", "hour")


async def test_an_app_named_rather_than_by_id_is_found_once_or_not_at_all(apigee):
    catalog = apigee_catalog(apps=3)
    catalog["apps"].append({**catalog["apps"][2], "appId": "app-twin", "developerId": "d-000"})
    apigee.state(**catalog)
    client = _client(apigee)
    try:
        assert await client.app_id_named("app-1") == "app-0001"
        for name in ("app-2", "app-9"):  # two apps of that name (other developers), none
            with pytest.raises(GatewayError) as refused:
                await client.app_id_named(name)
            assert refused.value.code == "not_found"
    finally:
        await client.aclose()


# --- the pure mapping ---------------------------------------------------------------


def _snapshot(catalog: dict[str, Any]) -> ApigeeSnapshot:
    return msgspec.convert(catalog, ApigeeSnapshot)


NOW = 1_800_000_000_000


def test_products_become_plans_with_their_quota_as_a_window_and_attributes_override():
    catalog = apigee_catalog(apps=6)
    catalog["products"] += [
        {"name": "legacy", "quota": "10", "quotaInterval": "5", "quotaTimeUnit": "minute"},
        {"name": "free"},
        {
            "name": "staging-only",
            "quota": "1",
            "quotaInterval": "1",
            "quotaTimeUnit": "day",
            "environments": ["test"],
        },
        {"name": "bad id!", "quota": "1", "quotaInterval": "1", "quotaTimeUnit": "day"},
    ]
    mapped = map_catalog(_snapshot(catalog), ApigeeMapping(), ["prod"], "t1", NOW)
    plans = mapped.catalog.plans
    assert plans["gold"] == Plan(id="gold", tenant="t1", windows={"day": 50}, price=2000, name="Gold")
    assert plans["silver-plan"].windows == {"hour": 1000}  # aforo:plan_id names the plan
    assert plans["bronze"].windows == {"week": 5}  # 7 days is a week
    assert plans["legacy"].windows == {} and plans["free"].windows == {}
    assert "staging-only" not in plans and "bad id!" not in plans
    reasons = {(s.kind, s.id): s.reason for s in mapped.skipped}
    assert reasons[("limit", "legacy")] == "a quota per 5 minute is not a calendar window"
    assert reasons[("plan", "staging-only")] == "in none of the connection's environments"
    assert ("plan", "bad id!") in reasons
    # The connection's mapping wins over the attributes.
    priced = ApigeeMapping(products={"gold": PlanChoice(plan_id="gold-2", price=5)})
    assert map_catalog(_snapshot(catalog), priced, [], "t1", NOW).catalog.plans["gold-2"].price == 5


def test_apps_become_consumers_with_status_keys_and_one_plan_by_an_explicit_rule():
    catalog = apigee_catalog(apps=6, developers=3)
    apps = catalog["apps"]
    apps[1]["status"] = "revoked"
    apps[2]["credentials"][0]["status"] = "revoked"
    apps[3]["credentials"][0]["expiresAt"] = str(NOW - 1)  # expired
    apps[4]["credentials"][0]["apiProducts"][0]["status"] = "pending"  # not granted yet
    catalog["developers"][2]["status"] = "inactive"  # app-5's developer (d-002)
    mapped = map_catalog(_snapshot(catalog), ApigeeMapping(), [], "t1", NOW)
    consumers, keys = mapped.catalog.consumers, mapped.catalog.keys
    # app-0 is granted gold and silver: the product whose name sorts first binds it.
    assert consumers["app-0000"] == ConsumerSpec(
        id="app-0000", plan_id="gold", tenant="t1", status=ConsumerStatus.ACTIVE
    )
    assert ("binding", "app-0000/silver") in {(s.kind, s.id) for s in mapped.skipped}
    # A revoked app keeps its keys registered: its status denies them, and undoes that.
    assert consumers["app-0001"].status is ConsumerStatus.REVOKED and "app-0001" in keys
    assert consumers["app-0005"].status is ConsumerStatus.REVOKED  # its developer is inactive
    # A revoked or expired credential grants nothing: no key, and no product to bind.
    assert "app-0002" not in consumers and "app-0003" not in consumers and "app-0004" not in consumers
    assert keys == {f"app-000{i}": frozenset({hash_api_key(app_key(i))}) for i in (0, 1, 5)}
    # product_priority decides first; default_plan_id takes apps granted nothing.
    ordered = ApigeeMapping(product_priority=["silver"], default_plan_id="gold", consumer_field="name")
    remapped = map_catalog(_snapshot(catalog), ordered, [], "t1", NOW).catalog.consumers
    assert remapped["app-0"].plan_id == "silver-plan"
    assert remapped["app-2"].plan_id == "gold" and remapped["app-4"].plan_id == "gold"


def test_a_gateway_saying_active_never_ends_a_suspension_the_sidecar_made():
    plan = Plan(id="gold", tenant="t1")
    held = Catalog(
        plans={"gold": plan}, consumers={"a": ConsumerSpec("a", "gold", "t1", ConsumerStatus.SUSPENDED)}
    )
    active = Catalog(
        plans={"gold": plan}, consumers={"a": ConsumerSpec("a", "gold", "t1", ConsumerStatus.ACTIVE)}
    )
    revoked = Catalog(
        plans={"gold": plan}, consumers={"a": ConsumerSpec("a", "gold", "t1", ConsumerStatus.REVOKED)}
    )
    assert diff(active, held, frozenset({"a"}), Removal.REVOKE).changes == ()
    (change,) = diff(revoked, held, frozenset({"a"}), Removal.REVOKE).changes
    assert (change.action, change.fields) == ("change", ("status",))
    # Where suspensions are pushed as revoked apps, reading one back is no revocation.
    assert diff(revoked, held, frozenset({"a"}), Removal.REVOKE, suspension_echoed=True).changes == ()
    back = Catalog(
        plans={"gold": plan}, consumers={"a": ConsumerSpec("a", "gold", "t1", ConsumerStatus.REVOKED)}
    )
    (resumed,) = diff(active, back, frozenset({"a"}), Removal.REVOKE).changes
    assert resumed.fields == ("status",)  # re-approved in Apigee: active again


def test_quota_fields_are_the_inverse_of_the_import():
    assert quota_fields({"week": 5}) == {"quota": "5", "quotaInterval": "7", "quotaTimeUnit": "day"}
    assert quota_fields({"minute": 100}) == {"quota": "100", "quotaInterval": "1", "quotaTimeUnit": "minute"}
    with pytest.raises(NoQuotaWindow):
        quota_fields({"minute": 1, "day": 2})
