"""A consumer's current period (issue 19, the customer portal's endpoint): each limited
window's used, limit, remaining and reset, and the wallet, exactly what decisions made
under concurrency left; who may read it. In process over every store."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import httpx

from tests.conftest import ADMIN, seed
from tests.kong.harness import fresh_minute
from tests.test_access import bearer, mint

PATH = "/v1/usage/consumers/{}/current"


async def test_the_current_period_is_what_concurrent_decisions_left(client: httpx.AsyncClient) -> None:
    await seed(client, windows={"minute": 100, "day": 1_000, "month": 5_000}, price=7, balance=10_000)
    fresh_minute()  # the decisions and the read in one minute
    ask = {"consumer_id": "c1", "product": "api"}
    answers = await asyncio.gather(*(client.post("/v1/authorize", json=ask) for _ in range(37)))
    assert sum(a.json()["allow"] for a in answers) == 37
    response = await client.get(PATH.format("c1"), headers=ADMIN)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["tenant"], body["consumer_id"], body["plan_id"], body["status"]) == (
        "default",
        "c1",
        "plan",
        "active",
    )
    assert (body["balance"], body["wallet_mode"]) == (10_000 - 37 * 7, "prepaid")
    windows = {w["window"]: w for w in body["windows"]}
    assert list(windows) == ["minute", "day", "month"]  # limited ones only, shortest first
    assert {name: (w["used"], w["limit"], w["remaining"]) for name, w in windows.items()} == {
        "minute": (37, 100, 63),
        "day": (37, 1_000, 963),
        "month": (37, 5_000, 4_963),
    }
    now = datetime.fromisoformat(body["as_of"])
    minute_reset = datetime.fromisoformat(windows["minute"]["resets_at"])
    assert minute_reset.second == 0 and 0 < (minute_reset - now).total_seconds() <= 60
    day_reset = datetime.fromisoformat(windows["day"]["resets_at"])
    assert (day_reset.hour, day_reset.minute, day_reset.tzinfo) == (0, 0, UTC)
    assert datetime.fromisoformat(windows["month"]["resets_at"]).day == 1


async def test_who_may_read_a_consumers_current_period(client: httpx.AsyncClient) -> None:
    await seed(client, windows={"day": 10}, consumer_id="mine")
    await seed(client, windows={"day": 10}, consumer_id="theirs")
    await seed(client, windows={"day": 10}, consumer_id="elsewhere", tenant="acme")
    developer = bearer(await mint(client, "developer", consumers=["mine"]))
    assert (await client.get(PATH.format("mine"), headers=developer)).status_code == 200
    hidden = await client.get(PATH.format("theirs"), headers=developer)
    assert (hidden.status_code, hidden.json()["error"]["code"]) == (404, "consumer_not_found")
    viewer = bearer(await mint(client, "viewer"))
    assert (await client.get(PATH.format("theirs"), headers=viewer)).status_code == 200
    other_tenant = await client.get(PATH.format("elsewhere") + "?tenant=acme", headers=viewer)
    assert (other_tenant.status_code, other_tenant.json()["error"]["code"]) == (404, "tenant_not_found")
    assert (await client.get(PATH.format("elsewhere") + "?tenant=acme", headers=ADMIN)).status_code == 200
    gateway = bearer(await mint(client, "gateway"))
    assert (await client.get(PATH.format("mine"), headers=gateway)).status_code == 403
    assert (await client.get(PATH.format("mine"))).status_code == 401


async def test_an_unknown_or_malformed_consumer_is_refused(client: httpx.AsyncClient) -> None:
    unknown = await client.get(PATH.format("nobody"), headers=ADMIN)
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "consumer_not_found")
    bad = await client.get(PATH.format("a b"), headers=ADMIN)
    assert (bad.status_code, bad.json()["error"]["code"]) == (400, "invalid_identifier")
    await seed(client, consumer_id="free")  # a plan without limits: no windows, the wallet only
    assert (await client.get(PATH.format("free"), headers=ADMIN)).json()["windows"] == []
