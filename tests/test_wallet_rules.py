"""The wallet lifecycle on every store: ingested usage rated exactly once, a prepaid
wallet held at its zero crossing and released by a top-up, auto top-up requests once
per threshold crossing; under concurrency, with exact counts and integer money."""

from __future__ import annotations

import asyncio
import copy
import json
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from sidecar.core.money import MAX_MICROS
from sidecar.core.wallet_rules import AutoTopup, after_debit, covers, rate_event, resumes
from sidecar.http.app import create_app
from sidecar.store.base import Store
from tests.conftest import ADMIN, seed
from tests.test_ingest import _analytics

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SECRET = "ingest-secret-0123456789"
AUTH = {"X-Aforo-Ingest-Secret": SECRET}
KONG_LOG = json.loads((FIXTURES / "kong_http_log.json").read_text())[0]
CENT = 10_000  # 0.01 in micros


@pytest.fixture
def wallet_settings(settings):
    return msgspec.structs.replace(settings, ingest_secrets={"default": SECRET})


@pytest.fixture
async def http(wallet_settings, store: Store):
    app = create_app(wallet_settings, store)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sidecar") as client:
        yield client


def kong_log(consumer_id: str, request_id: str, *, started_at: int | None = None, **request: Any) -> dict:
    log = copy.deepcopy(KONG_LOG)
    log["consumer"] = {"id": consumer_id}
    log["request"]["id"] = request_id
    log["request"]["headers"].update(request)
    log["started_at"] = int(time.time() * 1000) if started_at is None else started_at
    return log


async def view(http: httpx.AsyncClient, consumer_id: str) -> dict:
    response = await http.get(f"/v1/admin/consumers/{consumer_id}", headers=ADMIN)
    assert response.status_code == 200, response.text
    return response.json()


async def notices(http: httpx.AsyncClient, consumer_id: str) -> list[dict]:
    response = await http.get(f"/v1/admin/consumers/{consumer_id}/wallet-notices", headers=ADMIN)
    assert response.status_code == 200, response.text
    return response.json()["items"]


async def decide(http: httpx.AsyncClient, consumer_id: str, **fields: Any) -> dict:
    response = await http.post("/v1/authorize", json={"consumer_id": consumer_id, "product": "api", **fields})
    return response.json()


async def top_up(http: httpx.AsyncClient, consumer_id: str, amount: int) -> dict:
    response = await http.post(
        f"/v1/admin/consumers/{consumer_id}/topup", json={"amount": amount}, headers=ADMIN
    )
    assert response.status_code == 200, response.text
    return response.json()


# --- the pure rules ------------------------------------------------------------------


def test_a_prepaid_wallet_is_held_only_at_the_debit_that_stops_it_paying_for_a_call():
    def hold(before: int, after: int, **over: Any) -> bool:
        rules = {"price": CENT, "prepaid": True, "suspend_at_zero": True, "held": False, "topup": None}
        return after_debit(before, after, **{**rules, **over}).hold

    assert hold(CENT, 0)
    assert hold(CENT + 1, 1)  # 1 micro left cannot pay for a call
    assert not hold(2 * CENT, CENT)  # still pays for one
    assert not hold(0, -CENT)  # was not paying already: no crossing
    assert not hold(CENT, 0, held=True)
    assert not hold(CENT, 0, prepaid=False)
    assert not hold(CENT, 0, suspend_at_zero=False)
    assert hold(1, 0, price=0)  # a free plan's wallet still reaches zero
    assert not covers(0, 0) and covers(1, 0) and not covers(-1, 0)


def test_a_top_up_request_fires_at_the_threshold_crossing_only():
    topup = AutoTopup(threshold=5 * CENT, amount=100 * CENT)

    def request(before: int, after: int, auto: AutoTopup | None = topup) -> bool:
        return after_debit(
            before, after, price=CENT, prepaid=True, suspend_at_zero=True, held=False, topup=auto
        ).topup_requested

    assert request(5 * CENT, 4 * CENT)
    assert request(10 * CENT, -3 * CENT)
    assert not request(4 * CENT, 3 * CENT)  # already below
    assert not request(7 * CENT, 5 * CENT)  # at the threshold is not below it
    assert not request(5 * CENT, 4 * CENT, None)
    assert not request(5 * CENT, 4 * CENT, msgspec.structs.replace(topup, enabled=False))
    assert resumes(True, 1) and not resumes(True, 0) and not resumes(False, 5)


def test_an_event_is_rated_at_count_times_price_within_exact_money():
    assert rate_event(3, CENT) == (3, 3 * CENT)
    assert rate_event(1, 0) == (1, 0)
    assert rate_event(0, CENT) is None
    assert rate_event(MAX_MICROS // CENT, CENT) is not None
    assert rate_event(MAX_MICROS // CENT + 1, CENT) is None


# --- acceptance: ingested usage rated, suspension at zero, resume on top-up -----------


async def test_ten_thousand_ingested_calls_are_counted_and_charged_exactly_once_past_zero(http):
    await seed(http, plan_id="metered", windows={"day": 100_000}, price=CENT, consumer_id="app-1")
    await top_up(http, "app-1", 500 * CENT)  # 5.00
    logs = [kong_log("app-1", f"req-{i:05d}") for i in range(10_000)]
    sent = logs + random.Random(7).sample(logs, 500)  # 500 of them sent twice
    random.Random(8).shuffle(sent)
    batches = asyncio.Queue()
    for start in range(0, len(sent), 250):
        batches.put_nowait(sent[start : start + 250])
    answers: Counter[str] = Counter()

    async def client() -> None:  # one of 4 gateways posting batches concurrently
        while not batches.empty():
            batch = batches.get_nowait()
            response = await http.post("/integrations/kong/ingest", json=batch, headers=AUTH)
            assert response.status_code == 202, response.text
            answers.update(response.json())

    await asyncio.gather(*(client() for _ in range(4)))
    assert answers == {"accepted": 10_000, "duplicates": 500}

    consumer = await view(http, "app-1")
    assert consumer["windows"]["day"] == 10_000
    assert consumer["balance"] == 500 * CENT - 10_000 * CENT  # 5.00 - 100.00 = -95.00
    assert (consumer["status"], consumer["status_reason"]) == ("suspended", "wallet_empty")
    held = await notices(http, "app-1")
    assert [(n["type"], n["balance"]) for n in held] == [("suspended", 0)]  # once, at the crossing
    assert consumer["suspended_at"] == held[0]["at_ms"]
    denied = await decide(http, "app-1")
    assert (denied["allow"], denied["reason"], denied["status"]) == (False, "insufficient_balance", 402)

    await top_up(http, "app-1", 10_000 * CENT)  # 100.00: back above zero
    consumer = await view(http, "app-1")
    assert (consumer["status"], consumer["status_reason"], consumer["balance"]) == (
        "active",
        None,
        500 * CENT,
    )
    assert consumer["resumed_at"] is not None
    assert [n["type"] for n in await notices(http, "app-1")] == ["suspended", "resumed"]
    allowed = await decide(http, "app-1")
    assert (allowed["allow"], allowed["charged"]) == (True, CENT)


async def test_calls_a_decision_covered_are_not_charged_again_when_their_events_arrive(http, store):
    await seed(
        http, plan_id="metered", windows={"day": 100}, price=CENT, consumer_id="app-1", balance=100 * CENT
    )
    allowed = await decide(http, "app-1", request_id="req-decided")
    assert allowed["allow"]
    events = [
        kong_log("app-1", "req-decided"),  # its decision is on record under its request id
        kong_log("app-1", "req-plugin", **{"x-aforo-decision-id": "0123456789ab"}),  # set by the plugin
        kong_log("app-1", "req-native"),  # no decision: rated
    ]
    response = await http.post("/integrations/kong/ingest", json=events, headers=AUTH)
    assert response.json() == {"accepted": 3, "duplicates": 0}
    consumer = await view(http, "app-1")
    assert (consumer["windows"]["day"], consumer["balance"]) == (2, 98 * CENT)
    records = await store.usage("default", "app-1")
    assert [(r.request_id, r.decision_id, r.cost) for r in records] == [
        ("req-decided", allowed["decision_id"], CENT),
        ("req-native", "ev:req-native", CENT),
    ]
    assert len(await store.events("default", "app-1")) == 3  # every event is still recorded


async def test_usage_reported_over_v1_usage_is_rated_once_per_request_id(http):
    await seed(http, plan_id="metered", windows={"minute": 1000}, price=CENT, consumer_id="app-1")
    event = {"consumer_id": "app-1", "request_id": "r-1", "product": "api", "count": 3}
    for _ in range(3):
        response = await http.post("/v1/usage", json=event)
        assert response.status_code == 200, response.text
    consumer = await view(http, "app-1")
    # Prepaid with nothing in it: ingested calls already happened, so they are charged.
    assert (consumer["windows"]["minute"], consumer["balance"]) == (3, -3 * CENT)
    assert consumer["status"] == "active"  # it never paid for a call: no crossing
    assert await notices(http, "app-1") == []


async def test_an_event_of_an_ended_period_is_charged_but_counts_in_no_current_window(http, store):
    await seed(http, plan_id="metered", windows={"minute": 10, "day": 10}, price=CENT, consumer_id="app-1")
    two_minutes_ago = int(time.time() * 1000) - 120_000
    await http.post(
        "/integrations/kong/ingest", json=[kong_log("app-1", "old", started_at=two_minutes_ago)], headers=AUTH
    )
    consumer = await view(http, "app-1")
    assert consumer["balance"] == -CENT
    assert consumer["windows"]["minute"] == 0
    day = await store.usage("default", "app-1")
    assert [(r.ts_ms, r.hits) for r in day] == [(two_minutes_ago, 1)]


async def test_events_of_an_unknown_consumer_are_recorded_not_rated(http, store):
    response = await http.post("/integrations/kong/ingest", json=[kong_log("ghost", "g-1")], headers=AUTH)
    assert response.json() == {"accepted": 1, "duplicates": 0}
    assert len(await store.events("default", "ghost")) == 1
    assert await store.usage("default", "ghost") == []


# --- suspend at zero and auto top-up under concurrency ---------------------------------


async def test_sixty_four_deciders_across_the_zero_crossing_suspend_once_and_request_once(http):
    await seed(http, plan_id="metered", windows={"day": 100_000}, price=CENT, consumer_id="app-1")
    body = {
        "plan_id": "metered",
        "auto_topup": {"threshold": 30 * CENT, "amount": 100 * CENT, "currency": "EUR"},
    }
    response = await http.put("/v1/admin/consumers/app-1", json=body, headers=ADMIN)
    assert response.status_code == 200, response.text
    assert response.json()["auto_topup"] == {"enabled": True, **body["auto_topup"]}
    for _ in range(2):  # two crossings: the billing system tops up after the first
        await top_up(http, "app-1", 100 * CENT)  # 100 calls' worth

        async def client() -> Counter[str]:
            seen: Counter[str] = Counter()
            for _ in range(3):
                seen[(await decide(http, "app-1"))["reason"]] += 1
            return seen

        reasons = sum(await asyncio.gather(*(client() for _ in range(64))), Counter())
        assert reasons == {"ok": 100, "insufficient_balance": 92}
        consumer = await view(http, "app-1")
        assert (consumer["balance"], consumer["status_reason"]) == (0, "wallet_empty")
    got = await notices(http, "app-1")
    crossing = [("topup_requested", 29 * CENT), ("suspended", 0)]
    assert [(n["type"], n["balance"]) for n in got] == [*crossing, ("resumed", 100 * CENT), *crossing]
    request = got[0]
    assert (request["threshold"], request["amount"], request["currency"]) == (30 * CENT, 100 * CENT, "EUR")


async def test_a_manual_suspension_outlives_a_top_up_and_a_hold_outlives_a_manual_resume(http):
    await seed(http, plan_id="metered", price=CENT, consumer_id="app-1", balance=CENT)
    assert (await decide(http, "app-1"))["allow"]  # 0 left: held
    assert (await http.post("/v1/admin/consumers/app-1/suspend", headers=ADMIN)).status_code == 200
    consumer = await view(http, "app-1")
    assert (consumer["status"], consumer["status_reason"]) == ("suspended", "manual")
    await top_up(http, "app-1", 5 * CENT)  # lifts the hold, not the manual suspension
    consumer = await view(http, "app-1")
    assert (consumer["status"], consumer["status_reason"]) == ("suspended", "manual")
    assert (await decide(http, "app-1"))["reason"] == "suspended"
    assert (await http.post("/v1/admin/consumers/app-1/resume", headers=ADMIN)).status_code == 200
    assert (await decide(http, "app-1"))["allow"]

    # Held again; a manual resume does not pay the wallet, so the hold stays.
    for _ in range(4):
        assert (await decide(http, "app-1"))["allow"]
    assert (await view(http, "app-1"))["status_reason"] == "wallet_empty"
    assert (await http.post("/v1/admin/consumers/app-1/resume", headers=ADMIN)).status_code == 200
    assert (await view(http, "app-1"))["status_reason"] == "wallet_empty"
    assert (await decide(http, "app-1"))["reason"] == "insufficient_balance"


async def test_suspend_at_zero_off_and_postpaid_wallets_are_never_held(http):
    await seed(http, plan_id="metered", price=CENT, consumer_id="off", balance=CENT)
    response = await http.put(
        "/v1/admin/consumers/off", json={"plan_id": "metered", "suspend_at_zero": False}, headers=ADMIN
    )
    assert response.json()["suspend_at_zero"] is False
    await seed(http, plan_id="metered", price=CENT, consumer_id="post", balance=CENT, wallet_mode="postpaid")
    for consumer_id in ("off", "post"):
        assert (await decide(http, consumer_id))["allow"]
        consumer = await view(http, consumer_id)
        assert (consumer["status"], consumer["balance"]) == ("active", 0)
        assert await notices(http, consumer_id) == []
    assert (await decide(http, "off"))["reason"] == "insufficient_balance"  # still refused for money
    assert (await decide(http, "post"))["allow"]  # postpaid: accrues


async def test_a_top_up_that_leaves_the_wallet_at_or_below_zero_keeps_the_hold(http):
    await seed(http, plan_id="metered", windows={"day": 100}, price=CENT, consumer_id="app-1", balance=CENT)
    events = [kong_log("app-1", f"r-{i}") for i in range(3)]
    await http.post("/integrations/kong/ingest", json=events, headers=AUTH)  # 0.01 - 0.03
    assert (await view(http, "app-1"))["balance"] == -2 * CENT
    await top_up(http, "app-1", 2 * CENT)  # exactly zero
    consumer = await view(http, "app-1")
    assert (consumer["balance"], consumer["status_reason"]) == (0, "wallet_empty")
    await top_up(http, "app-1", 1)
    assert (await view(http, "app-1"))["status"] == "active"


@pytest.mark.parametrize(
    ("auto_topup", "field"),
    [
        ({"threshold": CENT, "amount": 0}, "auto_topup.amount"),
        ({"threshold": -1, "amount": CENT}, "auto_topup.threshold"),
        ({"threshold": CENT, "amount": CENT, "currency": "usd"}, "auto_topup.currency"),
        ({"threshold": CENT, "amount": CENT, "card": "4242"}, "auto_topup"),  # unknown field
    ],
)
async def test_a_bad_auto_topup_is_refused_whole(http, auto_topup, field):
    await seed(http, plan_id="metered", price=CENT, consumer_id="app-1")
    before = await view(http, "app-1")
    response = await http.put(
        "/v1/admin/consumers/app-1", json={"plan_id": "metered", "auto_topup": auto_topup}, headers=ADMIN
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["field"] == field
    assert await view(http, "app-1") == before


async def test_auto_topup_can_be_turned_off(http):
    await seed(http, plan_id="metered", price=CENT, consumer_id="app-1", balance=10 * CENT)
    on = {"plan_id": "metered", "auto_topup": {"threshold": 5 * CENT, "amount": CENT}}
    await http.put("/v1/admin/consumers/app-1", json=on, headers=ADMIN)
    off = {"plan_id": "metered", "auto_topup": {"enabled": False}}
    response = await http.put("/v1/admin/consumers/app-1", json=off, headers=ADMIN)
    assert response.json()["auto_topup"] is None
    for _ in range(6):
        assert (await decide(http, "app-1"))["allow"]
    assert await notices(http, "app-1") == []


async def test_wallet_notices_of_an_unknown_consumer_are_a_404(http):
    response = await http.get("/v1/admin/consumers/nobody/wallet-notices", headers=ADMIN)
    assert (response.status_code, response.json()["error"]["code"]) == (404, "consumer_not_found")


async def test_an_apigee_bucket_ingested_again_is_neither_stored_nor_charged_twice(http, store):
    """Without Postgres: the hot store alone remembers the bucket (25 h on Redis, see
    tests/test_ingest.py for the marker's lifetime)."""
    await seed(http, plan_id="premium", windows={"month": 1000}, price=CENT, consumer_id="app-acme-mobile")
    await top_up(http, "app-acme-mobile", 1000 * CENT)
    payload = _analytics(hours_ago=2)
    for expected in (2, 0):
        response = await http.post("/integrations/apigee/ingest", json=payload, headers=AUTH)
        assert response.json()["recordsProcessed"] == expected
    consumer = await view(http, "app-acme-mobile")
    assert (consumer["windows"]["month"], consumer["balance"]) == (120, 1000 * CENT - 120 * CENT)
    assert len(await store.events("default", "app-acme-mobile")) == 1
    assert [(r.hits, r.cost) for r in await store.usage("default", "app-acme-mobile")] == [(120, 120 * CENT)]


async def test_apigee_rows_are_only_recorded_when_the_shared_flow_charges_the_calls(wallet_settings, store):
    settings = msgspec.structs.replace(wallet_settings, apigee_analytics="record")
    app = create_app(settings, store)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sidecar") as http:
        await seed(
            http, plan_id="premium", windows={"month": 1000}, price=CENT, consumer_id="app-acme-mobile"
        )
        response = await http.post("/integrations/apigee/ingest", json=_analytics(), headers=AUTH)
        assert response.json()["recordsProcessed"] == 2
        consumer = await view(http, "app-acme-mobile")
        assert (consumer["windows"]["month"], consumer["balance"]) == (0, 0)
        assert len(await store.events("default", "app-acme-mobile")) == 1
        assert await store.usage("default", "app-acme-mobile") == []
