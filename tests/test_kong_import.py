"""Importing Kong's catalog: the Admin API client against a stub of the Admin API run as
a real process (pagination, Retry-After, a page failing mid-walk, 401), the pure
mapping of groups, plugins, consumers and keys, and the diff an import applies."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest

from sidecar.core.api_keys import hash_api_key
from sidecar.core.catalog_diff import Catalog, Change, Removal, diff
from sidecar.core.models import ConsumerSpec, ConsumerStatus, Plan
from sidecar.integrations.gateway_http import GatewayError, retry_after_seconds
from sidecar.integrations.kong.admin_client import KongAdminClient, set_denied
from sidecar.integrations.kong.mapping import (
    KongConsumer,
    KongEntity,
    KongGroup,
    KongKeyAuth,
    KongMapping,
    KongPlugin,
    KongSnapshot,
    map_catalog,
)
from sidecar.integrations.plan_choice import PlanChoice
from tests.stubs import StubServer

GROUPS = {"gold": (100, "minute"), "silver": (50, "minute"), "bronze": (1000, "day")}


def kong_catalog(consumers: int = 250) -> dict[str, Any]:
    """``consumers`` consumers spread over 3 groups, each group with a rate-limiting
    plugin (gold by rate-limiting-advanced), each consumer with one key-auth key."""
    groups = [
        {"id": f"g-{name}", "name": name, "tags": [f"aforo:price={(i + 1) * 1000}"]}
        for i, name in enumerate(GROUPS)
    ]
    plugins: list[dict[str, Any]] = []
    for name, (limit, window) in GROUPS.items():
        if name == "gold":
            config: dict[str, Any] = {"limit": [limit], "window_size": [60], "namespace": "gold"}
            plugin = "rate-limiting-advanced"
        else:
            config = {"second": None, "minute": None, "hour": None, "day": None, "month": None, "year": None}
            config[window] = limit
            plugin = "rate-limiting"
        plugins.append(
            {
                "id": f"p-{name}",
                "name": plugin,
                "config": config,
                "enabled": True,
                "consumer_group": {"id": f"g-{name}"},
            }
        )
    plugins.append({"id": "p-cors", "name": "cors", "config": {}, "enabled": True, "consumer_group": None})
    people = [
        {"id": f"c-{i:04d}", "username": f"user{i}", "custom_id": f"app-{i}", "tags": None}
        for i in range(consumers)
    ]
    members: dict[str, list[str]] = {f"g-{name}": [] for name in GROUPS}
    for i, person in enumerate(people):
        members[f"g-{list(GROUPS)[i % 3]}"].append(person["id"])
    keys = [
        {"id": f"k-{i}", "key": f"key-{i:04d}-secret", "consumer": {"id": p["id"]}}
        for i, p in enumerate(people)
    ]
    services = [{"id": "s-1", "name": "payments"}]
    return {
        "consumers": people,
        "groups": groups,
        "members": members,
        "plugins": plugins,
        "key_auths": keys,
        "services": services,
    }


@pytest.fixture
def kong() -> Iterator[StubServer]:
    server = StubServer("kong_admin")
    yield server
    server.stop()


async def _snapshot(kong: StubServer, **options: Any) -> KongSnapshot:
    client = KongAdminClient(kong.url, page_size=100, first_delay_s=0.01, **options)
    try:
        return await client.snapshot()
    finally:
        await client.aclose()


async def test_a_walk_follows_next_to_the_end_of_every_list(kong):
    kong.state(**kong_catalog())
    snapshot = await _snapshot(kong)
    assert len(snapshot.consumers) == 250 and len({c.id for c in snapshot.consumers}) == 250
    assert len(snapshot.keys) == 250
    assert sorted(len(m) for m in snapshot.members.values()) == [83, 83, 84]
    pages = [c for c in kong.calls() if c["path"] == "/consumers"]
    assert len(pages) == 3  # 100 + 100 + 50
    assert pages[0]["query"] == {"size": "100"} and "offset" in pages[1]["query"]


async def test_a_429_is_retried_after_its_retry_after(kong):
    kong.state(**kong_catalog(10))
    kong.faults(faults=[{"path": "/consumers", "page": 1, "status": 429, "times": 1, "retry_after": 1}])
    started = time.monotonic()
    snapshot = await _snapshot(kong)
    assert len(snapshot.consumers) == 10
    assert time.monotonic() - started >= 1.0  # waited as told, not the 10 ms backoff
    assert [c["path"] for c in kong.calls()].count("/consumers") == 2


async def test_a_page_failing_mid_walk_fails_the_whole_walk(kong):
    kong.state(**kong_catalog())
    kong.faults(faults=[{"path": "/consumers", "page": 3, "status": 500, "times": 100}])
    with pytest.raises(GatewayError) as failed:
        await _snapshot(kong)
    assert (failed.value.code, failed.value.status) == ("gateway_error", 500)
    assert [c["query"].get("offset") is not None for c in kong.calls() if c["path"] == "/consumers"][:2] == [
        False,
        True,
    ]


async def test_a_wrong_token_is_unauthorized_and_the_right_one_reads(kong):
    kong.state(**kong_catalog(3))
    kong.faults(token="s3cret-admin-token")
    with pytest.raises(GatewayError) as failed:
        await _snapshot(kong, token="wrong")
    assert failed.value.code == "unauthorized"
    assert len((await _snapshot(kong, token="s3cret-admin-token")).consumers) == 3


async def test_a_workspace_prefixes_every_path(kong):
    kong.state(**kong_catalog(3))
    kong.faults(workspace="team-a")
    assert len((await _snapshot(kong, workspace="team-a")).consumers) == 3
    with pytest.raises(GatewayError) as failed:
        await _snapshot(kong)
    assert failed.value.code == "not_found"


async def test_an_unreachable_admin_api_is_named_so():
    client = KongAdminClient("http://127.0.0.1:9", first_delay_s=0.01)
    with pytest.raises(GatewayError) as failed:
        await client.snapshot()
    await client.aclose()
    assert failed.value.code == "unreachable"


def test_retry_after_is_read_in_seconds_and_capped():
    assert retry_after_seconds("2", 0.5) == 2.0
    assert retry_after_seconds("0.25", 0.5) == 0.25
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", 0.5) == 0.5
    assert retry_after_seconds(None, 0.5) == 0.5
    assert retry_after_seconds("86400", 0.5) == 30.0


# --- the mapping (pure) ----------------------------------------------------------------


def _snapshot_of(catalog: dict[str, Any]) -> KongSnapshot:
    return KongSnapshot(
        consumers=msgspec.convert(catalog["consumers"], list[KongConsumer]),
        groups=msgspec.convert(catalog["groups"], list[KongGroup]),
        members=catalog["members"],
        plugins=msgspec.convert(catalog["plugins"], list[KongPlugin]),
        keys=msgspec.convert(catalog["key_auths"], list[KongKeyAuth]),
        services=msgspec.convert(catalog.get("services", []), list[KongEntity]),
        routes=msgspec.convert(catalog.get("routes", []), list[KongEntity]),
    )


def test_a_group_limited_on_services_and_routes_grants_those_products_only():
    catalog = kong_catalog(3)
    catalog["services"] = [{"id": "s-1", "name": "payments"}, {"id": "s-2", "name": None}]
    catalog["routes"] = [{"id": "r-1", "name": "refunds"}, {"id": "r-2", "name": "bad name"}]
    scoped = [("s-1", None), (None, "r-1"), ("s-2", None), (None, "r-2")]
    for i, (service, route) in enumerate(scoped):
        catalog["plugins"].append(
            {
                "id": f"p-scoped-{i}",
                "name": "rate-limiting",
                "config": {"hour": 10},
                "consumer_group": {"id": "g-silver"},
                "service": service and {"id": service},
                "route": route and {"id": route},
            }
        )
    catalog["plugins"][1]["service"] = {"id": "s-1"}  # silver's own limit, on payments
    mapped = map_catalog(_snapshot_of(catalog), KongMapping(), "default")
    # Named as the plugin names a call's product: the service's or route's name, else its id.
    assert mapped.catalog.plans["silver"].products == ["payments", "refunds", "s-2"]
    assert mapped.catalog.plans["silver"].windows == {"minute": 50, "hour": 10}
    assert ("product", "silver/bad name") in {(s.kind, s.id) for s in mapped.skipped}
    # gold's plugin is not scoped: every product.
    assert mapped.catalog.plans["gold"].products == []


def test_groups_become_plans_with_their_plugin_limits_and_tagged_prices():
    mapped = map_catalog(_snapshot_of(kong_catalog(6)), KongMapping(), "acme")
    assert mapped.catalog.plans == {
        "gold": Plan(id="gold", tenant="acme", windows={"minute": 100}, price=1000, name="gold"),
        "silver": Plan(id="silver", tenant="acme", windows={"minute": 50}, price=2000, name="silver"),
        "bronze": Plan(id="bronze", tenant="acme", windows={"day": 1000}, price=3000, name="bronze"),
    }
    assert mapped.catalog.consumers["c-0000"] == ConsumerSpec(id="c-0000", plan_id="gold", tenant="acme")
    assert mapped.catalog.consumers["c-0004"].plan_id == "silver"
    assert mapped.catalog.keys["c-0000"] == frozenset({hash_api_key("key-0000-secret")})
    assert mapped.skipped == []


def test_the_connection_mapping_overrides_plan_ids_prices_and_the_consumer_field():
    mapping = KongMapping(
        consumer_field="custom_id", groups={"gold": PlanChoice(plan_id="gold-2026", price=20_000)}
    )
    mapped = map_catalog(_snapshot_of(kong_catalog(3)), mapping, "default")
    assert mapped.catalog.plans["gold-2026"].price == 20_000 and "gold" not in mapped.catalog.plans
    assert set(mapped.catalog.consumers) == {"app-0", "app-1", "app-2"}
    assert mapped.catalog.consumers["app-0"].plan_id == "gold-2026"
    assert set(mapped.catalog.keys) == {"app-0", "app-1", "app-2"}


def test_a_consumer_in_several_groups_takes_the_first_by_priority_then_by_name():
    catalog = kong_catalog(1)
    catalog["members"] = {"g-gold": ["c-0000"], "g-silver": ["c-0000"], "g-bronze": ["c-0000"]}
    by_name = map_catalog(_snapshot_of(catalog), KongMapping(), "default")
    assert by_name.catalog.consumers["c-0000"].plan_id == "bronze"
    ranked = map_catalog(_snapshot_of(catalog), KongMapping(group_priority=["silver", "gold"]), "default")
    assert ranked.catalog.consumers["c-0000"].plan_id == "silver"


def test_what_cannot_be_mapped_is_skipped_with_a_reason():
    catalog = kong_catalog(2)
    catalog["members"] = {"g-gold": ["c-0000"]}  # c-0001 is in no group
    catalog["consumers"].append({"id": "c-x", "username": "has space", "custom_id": None})
    catalog["groups"].append({"id": "g-bad", "name": "bad name!", "tags": None})
    catalog["plugins"].append(
        {"id": "p-s", "name": "rate-limiting", "config": {"second": 5}, "consumer_group": {"id": "g-gold"}}
    )
    mapped = map_catalog(_snapshot_of(catalog), KongMapping(consumer_field="username"), "default")
    reasons = {(s.kind, s.id): s.reason for s in mapped.skipped}
    assert reasons[("consumer", "user1")] == "in no mapped consumer group, and no default_plan_id"
    assert reasons[("consumer", "c-x")].startswith("username 'has space'")
    assert reasons[("plan", "bad name!")].startswith("plan id 'bad name!'")
    assert reasons[("limit", "gold/second")] == "no such window in the sidecar"
    assert reasons[("key", "k-1")] == "its consumer is not imported"
    with_default = map_catalog(_snapshot_of(catalog), KongMapping(default_plan_id="free"), "default")
    assert with_default.catalog.consumers["c-0001"].plan_id == "free"


# --- the diff (pure) -------------------------------------------------------------------


def test_a_diff_adds_changes_and_revokes_only_what_the_source_owned():
    plan = Plan(id="gold", windows={"minute": 100}, price=1000)
    desired = Catalog(
        plans={"gold": plan, "new": Plan(id="new")},
        consumers={"a": ConsumerSpec(id="a", plan_id="gold"), "b": ConsumerSpec(id="b", plan_id="new")},
        keys={"a": frozenset({"h1", "h2"})},
    )
    current = Catalog(
        plans={"gold": Plan(id="gold", windows={"minute": 50}, price=1000)},
        consumers={
            "a": ConsumerSpec(id="a", plan_id="gold", status=ConsumerStatus.ACTIVE),
            "gone": ConsumerSpec(id="gone", plan_id="gold", status=ConsumerStatus.ACTIVE),
            "by-hand": ConsumerSpec(id="by-hand", plan_id="gold", status=ConsumerStatus.ACTIVE),
        },
        keys={"a": frozenset({"h1", "old"})},
    )
    result = diff(desired, current, frozenset({"a", "gone"}), Removal.REVOKE)
    assert list(result.changes) == [
        Change("plan", "gold", "change", ("windows",)),
        Change("plan", "new", "add"),
        Change("key", "a/h2", "add"),
        Change("key", "a/old", "revoke"),
        Change("consumer", "b", "add"),
        Change("consumer", "gone", "revoke"),
    ]
    assert result.counts() == {
        "plan.change": 1,
        "plan.add": 1,
        "key.add": 1,
        "key.revoke": 1,
        "consumer.add": 1,
        "consumer.revoke": 1,
    }
    ignored = diff(desired, current, frozenset({"a", "gone"}), Removal.IGNORE)
    assert all(c.action != "revoke" for c in ignored.changes)
    assert ignored.token != result.token


def test_a_diff_of_a_catalog_already_in_place_is_empty_and_its_token_stable():
    catalog = Catalog(plans={"p": Plan(id="p")}, consumers={"a": ConsumerSpec(id="a", plan_id="p")})
    first, second = (diff(catalog, catalog, frozenset({"a"}), Removal.REVOKE) for _ in range(2))
    assert first.changes == () and first.token == second.token
    moved = Catalog(plans={"p": Plan(id="p", price=1)}, consumers=catalog.consumers)
    assert diff(moved, catalog, frozenset(), Removal.REVOKE).token != first.token


async def test_a_consumer_named_by_custom_id_joins_and_leaves_the_deny_group_once(kong):
    kong.state(**kong_catalog(3))
    client = KongAdminClient(kong.url, page_size=100, first_delay_s=0.01)
    try:
        assert await set_denied(client, "app-1", "custom_id", "blocked", True) == "updated"
        assert await set_denied(client, "app-1", "custom_id", "blocked", True) == "unchanged"
        state = kong.current()
        assert [(a["group"], a["consumer"]["id"]) for a in state["acls"]] == [("blocked", "c-0001")]
        assert await set_denied(client, "user2", "username", "blocked", False) == "unchanged"
        assert await set_denied(client, "app-1", "custom_id", "blocked", False) == "updated"
        assert kong.current()["acls"] == []
        for consumer, field in (("app-9", "custom_id"), ("nobody", "id")):
            with pytest.raises(GatewayError) as missing:
                await set_denied(client, consumer, field, "blocked", True)
            assert missing.value.code == "not_found"
    finally:
        await client.aclose()
