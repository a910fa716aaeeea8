"""Drift against the gateway (issue 19, acceptance 6): what this sidecar allowed against
the gateway's own counts per consumer, product and hour, through the real paths: decisions
into the ledger, an Apigee analytics bucket and Kong logs through ingestion, the drain;
a run stores its report and raises one gateway.drift alert per flagged hour, once."""

from __future__ import annotations

import asyncio
import csv
import io
import time
from datetime import UTC, datetime, timedelta

import pytest

from sidecar.core.drift import drift_pct, is_flagged
from sidecar.core.models import AuthorizeRequest
from sidecar.reconciler import gateway_drift
from sidecar.reconciler.service import Reconciler
from tests.conftest import ADMIN, seed
from tests.test_access import bearer, mint
from tests.test_postgres import stack

SECRET = "ingest-secret-0123456789"
INGEST = {"X-Aforo-Ingest-Secret": SECRET}
# Apigee analytics stored, not rated: the aforo-authorize flow decides every call.
APIGEE_RECORDED = {
    "ingest_secrets": {"default": SECRET},
    "apigee_analytics": "record",
    "decision_timeout_ms": 10_000,
}


@pytest.mark.parametrize(
    ("allowed", "gateway", "pct", "flagged"),
    [
        (970, 1000, 3.0, True),
        (990, 1000, 1.0, False),
        (980, 1000, 2.0, False),
        (1030, 1000, 3.0, True),
        (5, 0, 100.0, True),
        (0, 0, 0.0, False),
        (0, 7, 100.0, True),
    ],
)
def test_drift_is_the_share_of_the_gateways_count(allowed, gateway, pct, flagged) -> None:
    assert drift_pct(allowed, gateway) == pct
    assert is_flagged(allowed, gateway, 2.0) is flagged


def _hour_with_room() -> datetime:
    """This UTC hour, once at least 2 minutes of it are left (decisions and the bucket
    must fall in one hour)."""
    now = datetime.now(UTC)
    if now.minute >= 58:
        time.sleep(3600 - now.minute * 60 - now.second + 1)
        now = datetime.now(UTC)
    return now.replace(minute=0, second=0, microsecond=0)


def _z(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def _bucket(hour: datetime, app: str, calls: int, errors: int = 0) -> dict:
    return {
        "organization": "acme",
        "environment": "prod",
        "timeRange": {"start": int(hour.timestamp() * 1000), "end": int(time.time() * 1000)},
        "metrics": [
            {"apiProduct": "payments", "developerApp": app, "proxy": "payments-v1", "messageCount": calls,
             "errorCount": errors, "totalResponseTime": 0, "responseSize": 0}
        ],
    }  # fmt: skip


async def _allow(s, consumer_id: str, n: int) -> None:
    async def one(i: int) -> bool:
        request = AuthorizeRequest(consumer_id=consumer_id, product="payments", request_id=f"r-{i}")
        return (await s.authorizer.authorize(request.validated())).allow

    assert sum(await asyncio.gather(*(one(i) for i in range(n)))) == n


async def test_an_apigee_bucket_of_1000_against_970_allowed_flags_3_pct_and_alerts_once(
    migrated_database, redis_url, prefix
):
    async with stack(migrated_database, redis_url, prefix, **APIGEE_RECORDED) as s:
        hour = _hour_with_room()
        for app in ("app-drifting", "app-close", "app-silent"):
            await seed(s.http, windows={"day": 10_000}, consumer_id=app, wallet_mode="postpaid")
        await _allow(s, "app-drifting", 970)
        await _allow(s, "app-close", 990)
        await _allow(s, "app-silent", 50)  # the gateway reports nothing on it: not compared
        for app in ("app-drifting", "app-close"):
            answer = await s.http.post(
                "/integrations/apigee/ingest", json=_bucket(hour, app, 1000), headers=INGEST
            )
            assert answer.json()["recordsProcessed"] == 1, answer.text
        await Reconciler(s.settings, s.store).run_once()  # decisions and events into Postgres

        end = hour + timedelta(hours=1)
        first = await gateway_drift.run(s.db, "default", hour - timedelta(hours=1), end, 2.0, "test")
        async with s.db.acquire() as conn:
            compared = await gateway_drift.compare(conn, "default", hour, end, 2.0)
        rows = {r.consumer_id: r for r in compared}
        assert [r.consumer_id for r in first.flagged_rows] == ["app-drifting"]
        assert set(rows) == {"app-drifting", "app-close"}
        drifting, close = rows["app-drifting"], rows["app-close"]
        assert (drifting.allowed, drifting.gateway, drifting.drift, drifting.drift_pct, drifting.flagged) == (
            970,
            1000,
            30,
            3.0,
            True,
        )
        assert (close.allowed, close.gateway, close.drift_pct, close.flagged) == (990, 1000, 1.0, False)
        assert (first.compared, first.flagged, first.alerts) == (2, 1, 1)
        alerts = await s.db.fetch("SELECT consumer_id, type, data FROM alerts")
        assert [(a["consumer_id"], a["type"]) for a in alerts] == [("app-drifting", "gateway.drift")]

        # Run again (the next day's job, an operator): stored again, no second alert.
        again = await gateway_drift.run(s.db, "default", hour, end, 2.0, "test")
        assert (again.flagged, again.alerts) == (1, 0)
        assert await s.db.fetchval("SELECT count(*) FROM alerts") == 1
        assert await s.db.fetchval("SELECT count(*) FROM gateway_drift_runs") == 2
        stored = await s.db.fetch(
            "SELECT consumer_id, allowed, gateway, flagged FROM gateway_drift_rows WHERE run_id = $1"
            " ORDER BY 1",
            int(first.id),
        )
        assert [tuple(r) for r in stored] == [
            ("app-close", 990, 1000, False),
            ("app-drifting", 970, 1000, True),
        ]

        # A tenant's own threshold: 0.5% flags the 1% hour too (its alert once).
        await s.http.put("/v1/admin/alert-rules", json={"drift_threshold_pct": 0.5}, headers=ADMIN)
        strict = await gateway_drift.run(s.db, "default", hour, end, 2.0, "test")
        assert (strict.threshold_pct, strict.flagged, strict.alerts) == (0.5, 2, 1)

        # The daily run: the day that ended at least the delay ago, once per tenant.
        day = hour.replace(hour=0)
        delay = timedelta(hours=2)
        # An hour after midnight the day is still within the delay: the day before runs.
        assert await gateway_drift.run_daily(s.db, 2.0, day + timedelta(days=1, hours=1), delay) == 1
        ran = await gateway_drift.run_daily(s.db, 2.0, day + timedelta(days=1, hours=2), delay)
        again = await gateway_drift.run_daily(s.db, 2.0, day + timedelta(days=1, hours=5), delay)
        assert (ran, again) == (1, 0)
        earlier, daily = await s.db.fetch(
            "SELECT range_start, range_end, threshold_pct, rows_flagged FROM gateway_drift_runs"
            " WHERE requested_by = 'schedule' ORDER BY range_start"
        )
        assert (earlier["range_end"], earlier["rows_flagged"]) == (day, 0)
        assert (daily["range_start"], daily["range_end"]) == (day, day + timedelta(days=1))
        assert (daily["threshold_pct"], daily["rows_flagged"]) == (0.5, 2)


async def test_per_request_gateway_events_count_what_the_gateway_let_through(
    migrated_database, redis_url, prefix
):
    """Kong's log events: a call we allowed (its decision id) counts, a call we denied
    (401/402/403/429/503 without a decision id) does not, a call the gateway passed
    without asking us (fail open: 200, no decision id) does, an upstream error on an
    allowed call does."""
    async with stack(migrated_database, redis_url, prefix, decision_timeout_ms=10_000) as s:
        hour = _hour_with_room()
        await seed(s.http, windows={"day": 10}, consumer_id="c1", wallet_mode="postpaid")
        decisions = [await s.decide("c1", product="payments", request_id=f"r-{i}") for i in range(13)]
        allowed = [d for d in decisions if d["allow"]]
        assert len(allowed) == 10
        events = [
            {"consumer_id": "c1", "request_id": d["request_id"], "product": "payments", "status": status,
             "decision_id": d["decision_id"] if d["allow"] else "", "started_at_ms": int(time.time() * 1000)}
            for d, status in zip(decisions, [200] * 9 + [502] + [429] * 3, strict=True)
        ]  # fmt: skip
        events += [
            {"consumer_id": "c1", "request_id": f"open-{i}", "product": "payments", "status": 200,
             "started_at_ms": int(time.time() * 1000)}
            for i in range(2)
        ]  # fmt: skip
        events.append({"consumer_id": "c1", "request_id": "kong-403", "product": "payments", "status": 403})
        assert (await s.http.post("/v1/usage", json=events)).json()["accepted"] == 16
        await Reconciler(s.settings, s.store).run_once()
        async with s.db.acquire() as conn:
            (row,) = await gateway_drift.compare(conn, "default", hour, hour + timedelta(hours=1), 2.0)
        assert (row.allowed, row.gateway, row.drift, row.flagged) == (10, 12, 2, True)
        assert row.drift_pct == round(2 * 100 / 12, 4)


async def test_the_gateway_report_over_http_as_json_and_csv_and_a_run_on_demand(
    migrated_database, redis_url, prefix
):
    async with stack(migrated_database, redis_url, prefix, **APIGEE_RECORDED) as s:
        hour = _hour_with_room()
        for app in ("app-a", "app-b"):
            await seed(s.http, windows={"day": 1_000}, consumer_id=app, wallet_mode="postpaid")
        await _allow(s, "app-a", 97)
        await _allow(s, "app-b", 100)
        for app in ("app-a", "app-b"):
            answer = await s.http.post(
                "/integrations/apigee/ingest", json=_bucket(hour, app, 100), headers=INGEST
            )
            assert answer.json()["recordsProcessed"] == 1
        await Reconciler(s.settings, s.store).run_once()
        span = f"from={_z(hour)}&to={_z(hour + timedelta(hours=1))}"
        path = f"/v1/admin/reconciliation?source=gateway&{span}"
        viewer = bearer(await mint(s.http, "viewer"))

        as_json = await s.http.get(path, headers=viewer)
        assert as_json.status_code == 200, as_json.text
        body = as_json.json()
        assert (body["tenant"], body["source"], body["threshold_pct"]) == ("default", "gateway", 2.0)
        got = {
            (r["consumer_id"], r["allowed"], r["gateway"], r["drift_pct"], r["flagged"]) for r in body["rows"]
        }
        assert got == {("app-a", 97, 100, 3.0, True), ("app-b", 100, 100, 0.0, False)}

        as_csv = await s.http.get(path, headers={**viewer, "Accept": "text/csv"})
        assert as_csv.headers["content-type"].startswith("text/csv")
        lines = list(csv.reader(io.StringIO(as_csv.text)))
        assert lines[0] == [
            "consumer_id",
            "product",
            "hour",
            "allowed",
            "gateway",
            "drift",
            "drift_pct",
            "flagged",
        ]
        assert sorted(lines[1:]) == [
            ["app-a", "payments", body["rows"][0]["hour"], "97", "100", "3", "3.0", "True"],
            ["app-b", "payments", body["rows"][0]["hour"], "100", "100", "0", "0.0", "False"],
        ]
        assert await s.db.fetchval("SELECT count(*) FROM gateway_drift_runs") == 0  # reading stores nothing

        forbidden = await s.http.post(f"/v1/admin/reconciliation/gateway?{span}", headers=viewer)
        assert forbidden.status_code == 403
        ran = await s.http.post(f"/v1/admin/reconciliation/gateway?{span}", headers=ADMIN)
        assert ran.status_code == 201, ran.text
        run = ran.json()
        assert (run["compared"], run["flagged"], run["alerts"]) == (2, 1, 1)
        assert [r["consumer_id"] for r in run["flagged_rows"]] == ["app-a"]
        alerts = (await s.http.get("/v1/admin/alerts?type=gateway.drift", headers=viewer)).json()["items"]
        assert [(a["consumer_id"], a["data"]["drift_pct"]) for a in alerts] == [("app-a", 3.0)]
        again = (await s.http.post(f"/v1/admin/reconciliation/gateway?{span}", headers=ADMIN)).json()
        assert again["alerts"] == 0

        h = _z(hour)
        for query, code, field in (
            ("source=gateway", "invalid_range", "from"),
            (f"source=gateway&from={h}&to={h}", "invalid_range", "from"),
            (f"source=gateway&from={h}&to=2099-01-01T00:00:00Z", "invalid_range", "to"),
            (
                f"source=gateway&from={h[:14]}30:00Z&to={_z(hour + timedelta(hours=2))}",
                "invalid_range",
                "from",
            ),
            (f"source=gateway&from=yesterday&to={h}", "invalid_time", "from"),
            ("source=redis", "invalid_request", "source"),
        ):
            refused = await s.http.get(f"/v1/admin/reconciliation?{query}", headers=viewer)
            assert (
                refused.status_code,
                refused.json()["error"]["code"],
                refused.json()["error"]["field"],
            ) == (400, code, field), query
        assert await s.db.fetchval("SELECT count(*) FROM gateway_drift_runs") == 2
        # The ledger report takes ?tenant= too: one the caller may see.
        ledger = await s.http.get("/v1/admin/reconciliation?tenant=default", headers=viewer)
        assert ledger.status_code == 200 and "rows" in ledger.json()
        elsewhere = await s.http.get("/v1/admin/reconciliation?tenant=acme", headers=viewer)
        assert (elsewhere.status_code, elsewhere.json()["error"]["code"]) == (404, "tenant_not_found")
        bad = await s.http.get("/v1/admin/reconciliation?tenant=", headers=ADMIN)
        assert (bad.status_code, bad.json()["error"]["code"]) == (400, "invalid_identifier")


async def test_the_gateway_report_needs_postgres(client) -> None:
    response = await client.get(
        "/v1/admin/reconciliation?source=gateway&from=2026-01-01&to=2026-01-02", headers=ADMIN
    )
    assert (response.status_code, response.json()["error"]["code"]) == (501, "postgres_required")
    ran = await client.post("/v1/admin/reconciliation/gateway?from=2026-01-01&to=2026-01-02", headers=ADMIN)
    assert (ran.status_code, ran.json()["error"]["code"]) == (501, "postgres_required")
