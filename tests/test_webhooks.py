"""Alerts and signed webhooks (issue 19): quota crossings fire once per window period
across sidecar processes, the outbox delivers every alert through a receiver's outage
in order and signed per Standard Webhooks, a SIGKILLed reconciler loses and doubles
nothing; the webhook API and its refusals. Real Redis, Postgres, processes, receivers."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import random
import time
from collections import Counter

import httpx
import msgspec
import pytest
import standardwebhooks

from sidecar.core.clock import now_ms
from sidecar.core.webhooks import RetryPolicy
from sidecar.integrations.secret_box import SecretBox, new_key
from sidecar.reconciler.service import Reconciler
from sidecar.reconciler.webhooks import Dispatcher
from tests.conftest import ADMIN, seed, until
from tests.kong.harness import fresh_minute
from tests.test_postgres import stack
from tests.webhook_receiver import Receiver

KEYS = {"k1": new_key()}
QUOTA = ["quota.threshold"]


def verify(secret: str, headers: dict[str, str], body: bytes) -> None:
    """A receiver's check, written from the Standard Webhooks specification (for when
    the test's clock is not the wall clock the library compares timestamps with)."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    content = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()
    given = [s.split(",", 1)[1] for s in headers["webhook-signature"].split(" ") if s.startswith("v1,")]
    assert any(hmac.compare_digest(expected, g) for g in given), "the signature does not verify"


async def _webhook(http: httpx.AsyncClient, webhook_id: str, url: str, events: list[str], **fields) -> str:
    response = await http.put(
        f"/v1/admin/webhooks/{webhook_id}", json={"url": url, "events": events, **fields}, headers=ADMIN
    )
    assert response.status_code == 201, response.text
    return response.json()["secret"]


# --- the API ------------------------------------------------------------------------


async def test_a_webhook_is_made_read_replaced_rotated_and_deleted_its_secret_shown_once(
    migrated_database, redis_url, prefix
):
    async with stack(migrated_database, redis_url, prefix, secret_keys=KEYS) as s:
        made = await s.http.put(
            "/v1/admin/webhooks/billing",
            json={"url": "https://billing.example.com/hooks", "events": ["wallet.empty", "quota.threshold"]},
            headers=ADMIN,
        )
        assert made.status_code == 201, made.text
        body = made.json()
        secret = body["secret"]
        assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) == 32
        assert body["events"] == ["quota.threshold", "wallet.empty"] and body["enabled"] is True

        read = (await s.http.get("/v1/admin/webhooks/billing", headers=ADMIN)).json()
        assert "secret" not in read and read["url"] == "https://billing.example.com/hooks"
        listed = (await s.http.get("/v1/admin/webhooks", headers=ADMIN)).json()["items"]
        assert [w["id"] for w in listed] == ["billing"] and "secret" not in listed[0]

        sealed = await s.db.fetchval("SELECT sealed_secret FROM webhooks WHERE id = 'billing'")
        assert secret not in sealed and sealed.startswith("v1.k1.")
        assert SecretBox(KEYS).open(sealed, "webhook:default:billing") == secret

        replaced = await s.http.put(
            "/v1/admin/webhooks/billing",
            json={"url": "https://billing.example.com/v2", "events": ["quota.threshold"], "enabled": False},
            headers=ADMIN,
        )
        assert replaced.status_code == 200 and "secret" not in replaced.json()
        assert await s.db.fetchval("SELECT sealed_secret FROM webhooks WHERE id = 'billing'") == sealed

        rotated = await s.http.post("/v1/admin/webhooks/billing/secret", headers=ADMIN)
        assert rotated.status_code == 200
        new_secret = rotated.json()["secret"]
        assert new_secret.startswith("whsec_") and new_secret != secret

        audit = await s.db.fetch(
            "SELECT before::text AS b, after::text AS a FROM audit_log WHERE target = 'billing'"
        )
        assert len(audit) == 3  # made, replaced, rotated
        for row in audit:
            for value in (secret, new_secret, sealed, "sealed_secret"):
                assert value not in (row["b"] or "") + (row["a"] or "")

        deleted = await s.http.delete("/v1/admin/webhooks/billing", headers=ADMIN)
        assert deleted.json() == {"deleted": True, "tenant": "default", "id": "billing"}
        gone = await s.http.get("/v1/admin/webhooks/billing", headers=ADMIN)
        assert (gone.status_code, gone.json()["error"]["code"]) == (404, "webhook_not_found")
        again = await s.http.delete("/v1/admin/webhooks/billing", headers=ADMIN)
        assert again.status_code == 404


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"url": "http://billing.example.com/hooks", "events": QUOTA}, "url"),  # plain http off loopback
        ({"url": "ftp://billing.example.com/hooks", "events": QUOTA}, "url"),
        ({"url": "https://user:pw@billing.example.com/", "events": QUOTA}, "url"),
        ({"url": "https://billing.example.com/a b", "events": QUOTA}, "url"),
        ({"url": "https://[::1/", "events": QUOTA}, "url"),
        ({"url": "https://billing.example.com/" + "a" * 2048, "events": QUOTA}, "url"),
        ({"url": "https://billing.example.com/", "events": []}, "events"),
        ({"url": "https://billing.example.com/", "events": ["quota.exceeded"]}, "events"),
        ({"url": "https://billing.example.com/", "events": QUOTA, "description": "a\x00b"}, None),
        ({"url": "https://billing.example.com/", "events": QUOTA, "secret": "mine"}, None),
        ({"events": QUOTA}, None),
        ({"url": "https://billing.example.com/", "events": QUOTA, "tenant": ""}, "tenant"),
        ({"url": "https://billing.example.com/", "events": QUOTA, "tenant": "a b"}, "tenant"),
    ],
)
async def test_a_bad_webhook_is_refused_and_nothing_is_made(
    migrated_database, redis_url, prefix, body, field
):
    async with stack(migrated_database, redis_url, prefix, secret_keys=KEYS) as s:
        response = await s.http.put("/v1/admin/webhooks/w1", json=body, headers=ADMIN)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        if field is not None:
            assert error["field"] == field
        assert await s.db.fetchval("SELECT count(*) FROM webhooks") == 0


async def test_webhook_calls_refuse_what_they_cannot_do(migrated_database, redis_url, prefix):
    async with stack(migrated_database, redis_url, prefix) as s:  # no secret keys
        response = await s.http.put(
            "/v1/admin/webhooks/w1", json={"url": "https://a.example.com/", "events": QUOTA}, headers=ADMIN
        )
        assert (response.status_code, response.json()["error"]["code"]) == (501, "secret_keys_required")
        assert await s.db.fetchval("SELECT count(*) FROM webhooks") == 0
    async with stack(migrated_database, redis_url, prefix, secret_keys=KEYS) as s:
        await _webhook(s.http, "w1", "https://a.example.com/", QUOTA)
        cases = [
            ("GET", "/v1/admin/webhooks/a%20b", 400, "invalid_identifier"),
            ("GET", "/v1/admin/webhooks/nope/deliveries", 404, "webhook_not_found"),
            ("GET", "/v1/admin/webhooks/w1/deliveries?status=lost", 400, "invalid_request"),
            ("GET", "/v1/admin/webhooks/w1/deliveries?cursor=eA", 400, "invalid_request"),
            ("POST", "/v1/admin/webhooks/w1/deliveries/12x/redeliver", 400, "invalid_request"),
            ("POST", "/v1/admin/webhooks/w1/deliveries/99999999/redeliver", 404, "delivery_not_found"),
            ("POST", "/v1/admin/webhooks/nope/secret", 404, "webhook_not_found"),
            ("GET", "/v1/admin/alerts?type=quota", 400, "invalid_request"),
            ("GET", "/v1/admin/alerts?limit=0", 400, "invalid_request"),
        ]
        for method, path, status, code in cases:
            response = await s.http.request(method, path, headers=ADMIN)
            assert (response.status_code, response.json()["error"]["code"]) == (status, code), path
        assert (await s.http.get("/v1/admin/alerts")).status_code == 401


# --- acceptance 1: 150 decisions over 2 processes, one delivery per level ------------


async def test_150_decisions_over_two_processes_deliver_each_quota_level_once_signed(
    migrated_database, redis_url, prefix, start_sidecar, reconciler
):
    receiver = Receiver().start()
    env = {
        "AFORO_REDIS_URL": redis_url,
        "AFORO_KEY_PREFIX": prefix,
        "AFORO_DATABASE_URL": migrated_database,
        "AFORO_SECRET_KEYS": f"k1={KEYS['k1']}",
        "AFORO_GRPC_PORT": "0",
    }
    try:
        sidecars = [start_sidecar(env) for _ in range(2)]
        async with httpx.AsyncClient(base_url=sidecars[0].url, timeout=10) as admin:
            secret = await _webhook(admin, "billing", receiver.url, QUOTA)
            await seed(admin, windows={"minute": 100}, price=1, balance=1_000_000, consumer_id="c1")
        reconciler(
            migrated_database,
            redis_url,
            prefix,
            AFORO_SECRET_KEYS=f"k1={KEYS['k1']}",
            AFORO_WEBHOOK_POLL_MS="100",
        )

        async def burst(calls: int, tag: str) -> int:
            """``calls`` decisions from 64 concurrent clients, alternating the processes."""
            clients = [httpx.AsyncClient(base_url=sc.decision_url, timeout=10) for sc in sidecars]
            todo = list(range(calls))

            async def client(n: int) -> int:
                allowed = 0
                while todo:
                    i = todo.pop()
                    ask = {"consumer_id": "c1", "product": "api", "request_id": f"{tag}-{i}"}
                    allowed += (await clients[n % 2].post("/v1/authorize", json=ask)).json()["allow"]
                return allowed

            try:
                return sum(await asyncio.gather(*(client(n) for n in range(64))))
            finally:
                for c in clients:
                    await c.aclose()

        fresh_minute(margin_s=20)
        first_minute = time.time() // 60
        assert await burst(150, "a") == 100
        assert time.time() // 60 == first_minute, "the burst straddled a minute"
        await until(lambda: len(receiver.messages()) >= 3, 30, "three deliveries")
        await asyncio.sleep(1.5)  # a few more dispatcher passes: nothing else may come
        messages = receiver.messages()
        assert len(messages) == 3
        webhook = standardwebhooks.Webhook(secret)
        payloads = [webhook.verify(m.body, m.headers) for m in messages]  # raises if a signature fails
        assert sorted(p["data"]["data"]["level"] for p in payloads) == [80, 90, 100]
        assert {p["type"] for p in payloads} == {"quota.threshold"}
        assert {(p["data"]["consumer_id"], p["data"]["data"]["window"]) for p in payloads} == {
            ("c1", "minute")
        }
        assert len({m.headers["webhook-id"] for m in messages}) == 3
        ends = {p["data"]["data"]["period_end_ms"] for p in payloads}
        assert ends == {int(first_minute + 1) * 60_000}
        tampered = messages[0].body.replace(b"minute", b"hour")
        with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
            webhook.verify(tampered, messages[0].headers)

        # The next minute starts fresh: 85 calls cross 80% again, once.
        await asyncio.sleep((first_minute + 1) * 60 - time.time() + 0.2)
        assert await burst(85, "b") == 85
        await until(lambda: len(receiver.messages()) >= 4, 30, "the next minute's delivery")
        await asyncio.sleep(1.5)
        later = [webhook.verify(m.body, m.headers) for m in receiver.messages()[3:]]
        assert [(p["data"]["data"]["level"], p["data"]["data"]["period_end_ms"]) for p in later] == [
            (80, int(first_minute + 2) * 60_000)
        ]
    finally:
        receiver.stop()


# --- acceptance 2: the receiver down for 10 minutes ---------------------------------


class Clock:
    """The dispatcher's clock, moved by the test (the retry schedule over 10 minutes
    without waiting 10 minutes)."""

    def __init__(self) -> None:
        self.ms = now_ms()

    def __call__(self) -> int:
        return self.ms


async def test_a_receiver_down_for_ten_minutes_gets_every_event_in_order_once_back(
    migrated_database, redis_url, prefix
):
    receiver = Receiver()  # not started: connections are refused
    async with stack(migrated_database, redis_url, prefix, secret_keys=KEYS) as s:
        secret = await _webhook(s.http, "billing", receiver.url, ["quota.threshold", "wallet.empty"])
        consumers = [f"c{i}" for i in range(4)]
        for consumer_id in consumers:
            await seed(s.http, windows={"day": 10}, price=100, balance=1_000, consumer_id=consumer_id)
        # 10 calls each: 80, 90 and 100% of the day; the 10th takes the wallet to 0 (wallet.empty).
        for consumer_id in consumers:
            answers = await asyncio.gather(*(s.decide(consumer_id) for _ in range(12)))
            assert sum(a["allow"] for a in answers) == 10
        await Reconciler(s.settings, s.store).run_once()
        every = await s.db.fetch("SELECT id, consumer_id, type FROM alerts ORDER BY id")
        assert Counter(a["type"] for a in every) == {
            "quota.threshold": 12,
            "wallet.empty": 4,
            "balance.zero": 4,
        }
        alerts = [a for a in every if a["type"] != "balance.zero"]  # what the endpoint subscribed to
        assert await s.db.fetchval("SELECT count(*) FROM webhook_deliveries") == 16

        clock = Clock()
        policy = RetryPolicy(first_s=5, max_s=3600, period_s=86_400)
        dispatcher = Dispatcher(s.db, SecretBox(KEYS), policy, timeout_s=2, clock=clock, rng=random.Random(7))
        try:
            down_until = clock.ms + 600_000
            while clock.ms < down_until:  # ten minutes of refused connections
                await dispatcher.run_once()
                clock.ms += 5_000
            rows = await s.db.fetch(
                "SELECT consumer_id, id, attempts, status FROM webhook_deliveries ORDER BY consumer_id, id"
            )
            heads = {r["consumer_id"]: r for r in reversed(rows)}  # the oldest of each consumer
            for r in rows:
                assert r["status"] == "pending"
                # Only each consumer's oldest delivery is tried; the others wait behind it.
                assert (r["attempts"] > 0) == (r["id"] == heads[r["consumer_id"]]["id"])
            # Exponential backoff from 5 s: about 8 attempts in 10 minutes, not 120.
            assert all(6 <= heads[c]["attempts"] <= 10 for c in consumers), [
                h["attempts"] for h in heads.values()
            ]

            log = (
                await s.http.get("/v1/admin/webhooks/billing/deliveries?status=pending", headers=ADMIN)
            ).json()
            tried = [d for d in log["items"] if d["attempts"]]
            assert len(tried) == 4
            for delivery in tried:
                assert delivery["last_error"].startswith("ConnectError") and delivery["last_status"] is None
                assert delivery["next_attempt_at"] is not None and delivery["delivered_at"] is None
                times = [a["at"] for a in delivery["history"]]
                assert (
                    times == sorted(times)
                    and len(times) == delivery["attempts"]
                    and [a["attempt"] for a in delivery["history"]]
                    == list(range(1, delivery["attempts"] + 1))
                )

            receiver.start()
            for _ in range(400):
                await dispatcher.run_once()
                if not await s.db.fetchval(
                    "SELECT count(*) FROM webhook_deliveries WHERE status = 'pending'"
                ):
                    break
                clock.ms += 5_000
        finally:
            await dispatcher.close()
            receiver.stop()
        messages = receiver.messages()
        for m in messages:
            verify(secret, m.headers, m.body)
        by_id = {}
        for m in messages:
            by_id.setdefault(m.headers["webhook-id"], m.body)
            assert by_id[m.headers["webhook-id"]] == m.body  # a retry is the same message
        assert sorted(by_id) == sorted(f"msg_{a['id']}" for a in alerts)
        # In order per consumer: each consumer's messages arrive in the order they fired.
        sent: dict[str, list[int]] = {}
        for m in messages:
            data = msgspec.json.decode(m.body)["data"]
            sent.setdefault(data["consumer_id"], []).append(int(data["id"]))
        for consumer_id in consumers:
            fired = [a["id"] for a in alerts if a["consumer_id"] == consumer_id]
            assert sent[consumer_id] == fired
        done = await s.db.fetch("SELECT status, attempts, delivered_at FROM webhook_deliveries")
        assert all(r["status"] == "delivered" and r["delivered_at"] is not None for r in done)

        # Redelivered by hand: the same webhook-id again.
        first = await s.db.fetchval("SELECT min(id) FROM webhook_deliveries")
        # While a dispatcher holds it (a lease), a redelivery is refused and changes nothing.
        await s.db.execute(
            "UPDATE webhook_deliveries SET status = 'pending', lease_until = now() + interval '1 minute'"
            " WHERE id = $1",
            first,
        )
        busy = await s.http.post(f"/v1/admin/webhooks/billing/deliveries/{first}/redeliver", headers=ADMIN)
        assert (busy.status_code, busy.json()["error"]["code"]) == (409, "delivery_in_flight")
        await s.db.execute(
            "UPDATE webhook_deliveries SET status = 'delivered', lease_until = NULL WHERE id = $1", first
        )
        again = await s.http.post(f"/v1/admin/webhooks/billing/deliveries/{first}/redeliver", headers=ADMIN)
        assert again.status_code == 202, again.text
        receiver.start()
        dispatcher = Dispatcher(s.db, SecretBox(KEYS), policy, timeout_s=2)
        try:
            await dispatcher.run_once()
        finally:
            await dispatcher.close()
            receiver.stop()
        resent = receiver.messages()[len(messages) :]
        assert [m.headers["webhook-id"] for m in resent] == [f"msg_{alerts[0]['id']}"]
        row = await s.db.fetchrow("SELECT status, attempts FROM webhook_deliveries WHERE id = $1", first)
        assert row["status"] == "delivered" and row["attempts"] >= 2

        listed = (await s.http.get("/v1/admin/alerts?limit=5", headers=ADMIN)).json()
        assert [a["id"] for a in listed["items"]] == [str(a["id"]) for a in reversed(every)][:5]
        page_two = await s.http.get(
            f"/v1/admin/alerts?limit=20&cursor={listed['next_cursor']}", headers=ADMIN
        )
        assert [a["id"] for a in page_two.json()["items"]] == [str(a["id"]) for a in reversed(every)][5:]
        assert page_two.json()["next_cursor"] is None
        quota_only = await s.http.get("/v1/admin/alerts?type=quota.threshold&consumer_id=c1", headers=ADMIN)
        assert [a["data"]["level"] for a in quota_only.json()["items"]] == [100, 90, 80]


async def test_a_delivery_is_given_up_after_the_retry_period_and_a_deleted_webhook_stops(
    migrated_database, redis_url, prefix
):
    receiver = Receiver().start()
    receiver.status = 500
    async with stack(migrated_database, redis_url, prefix, secret_keys=KEYS) as s:
        await _webhook(s.http, "w1", receiver.url, QUOTA)
        await _webhook(s.http, "w2", receiver.url, QUOTA)
        await seed(s.http, windows={"day": 1}, consumer_id="c1")
        assert (await s.decide("c1"))["allow"]
        await Reconciler(s.settings, s.store).run_once()
        assert await s.db.fetchval("SELECT count(*) FROM webhook_deliveries") == 6  # 3 levels x 2 endpoints
        clock = Clock()
        dispatcher = Dispatcher(s.db, SecretBox(KEYS), RetryPolicy(5, 3600, 86_400), clock=clock)
        try:
            deleted = await s.http.delete("/v1/admin/webhooks/w2", headers=ADMIN)
            assert deleted.status_code == 200, deleted.text
            for _ in range(64):  # 26.7 hours in steps of 25 minutes
                await dispatcher.run_once()
                clock.ms += 1_500_000
        finally:
            await dispatcher.close()
            receiver.stop()
        rows = await s.db.fetch(
            "SELECT webhook_id, status, attempts, last_status, last_error FROM webhook_deliveries ORDER BY id"
        )
        w1 = [r for r in rows if r["webhook_id"] == "w1"]
        # The first is retried for its day of 500s and given up; the two behind it waited
        # that day too, so each is tried once more and given up.
        assert [r["status"] for r in w1] == ["failed", "failed", "failed"]
        assert [r["attempts"] for r in w1][1:] == [1, 1] and w1[0]["attempts"] > 20
        assert {(r["last_status"], r["last_error"]) for r in w1} == {(500, "HTTP 500")}
        assert len(receiver.messages()) == sum(r["attempts"] for r in w1)
        w2 = [r for r in rows if r["webhook_id"] == "w2"]
        assert [(r["status"], r["attempts"], r["last_error"]) for r in w2] == [
            ("failed", 0, "the webhook was deleted")
        ] * 3


# --- acceptance 3: the reconciler SIGKILLed in the middle of a drain -----------------


async def test_a_reconciler_killed_mid_drain_loses_and_doubles_no_alert(
    migrated_database, redis_url, prefix, reconciler
):
    async with stack(migrated_database, redis_url, prefix, secret_keys=KEYS, decision_timeout_ms=10_000) as s:
        await _webhook(s.http, "billing", "https://billing.example.com/hooks", QUOTA, enabled=False)
        await s.http.put("/v1/admin/plans/p", json={"windows": {"day": 10}}, headers=ADMIN)
        consumers = [f"c{i:03d}" for i in range(300)]
        for consumer_id in consumers:
            response = await s.http.put(
                f"/v1/admin/consumers/{consumer_id}",
                json={"plan_id": "p", "wallet_mode": "postpaid"},
                headers=ADMIN,
            )
            assert response.status_code == 201
        todo = [(c, i) for c in consumers for i in range(12)]
        random.Random(3).shuffle(todo)

        async def worker() -> int:
            allowed = 0
            while todo:
                consumer_id, i = todo.pop()
                allowed += (await s.decide(consumer_id, request_id=f"r-{i}"))["allow"]
            return allowed

        assert sum(await asyncio.gather(*(worker() for _ in range(32)))) == 3_000

        async def count(sql: str) -> int:
            return await s.db.fetchval(sql)

        for kill in range(3):
            before = await count("SELECT count(*) FROM usage_records")
            process = reconciler(
                migrated_database,
                redis_url,
                prefix,
                AFORO_DRAIN_BATCH="3",
                AFORO_SECRET_KEYS=f"k1={KEYS['k1']}",
            )

            async def moved(before: int = before) -> bool:
                return await count("SELECT count(*) FROM usage_records") > before + 300

            await until(moved, 60, "the drain to progress")
            process.kill()
            assert await count("SELECT count(*) FROM usage_records") < 3_000, f"kill {kill} came too late"
        reconciler(migrated_database, redis_url, prefix, AFORO_SECRET_KEYS=f"k1={KEYS['k1']}")

        async def drained() -> bool:
            return await count("SELECT count(*) FROM usage_records") == 3_000

        await until(drained, 120, "all usage to arrive")
        await asyncio.sleep(0.5)
        assert await count("SELECT count(*) FROM alerts") == 900  # 300 consumers x 80, 90, 100%
        per = await s.db.fetch(
            "SELECT consumer_id, array_agg(data->>'level' ORDER BY id) AS levels FROM alerts GROUP BY 1"
        )
        assert {r["consumer_id"]: list(r["levels"]) for r in per} == {
            c: ["80", "90", "100"] for c in consumers
        }
        # Each alert has exactly one delivery waiting (the endpoint is disabled): none doubled.
        assert await count("SELECT count(*) FROM webhook_deliveries WHERE status = 'pending'") == 900
        assert await count("SELECT count(DISTINCT alert_id) FROM webhook_deliveries") == 900


# --- alert rules and balance alerts ---------------------------------------------------


async def test_a_tenants_rules_choose_what_fires_and_balance_alerts_fire_once_per_crossing(
    migrated_database, redis_url, prefix
):
    async with stack(migrated_database, redis_url, prefix, secret_keys=KEYS) as s:
        defaults = (await s.http.get("/v1/admin/alert-rules", headers=ADMIN)).json()
        assert defaults == {
            "tenant": "default",
            "quota_levels": [80, 90, 100],
            "low_balance_micros": None,
            "balance_zero": True,
            "wallet_empty": True,
            "wallet_topup_requested": True,
            "wallet_resumed": True,
            "drift_threshold_pct": None,
            "usage_spike_pct": 200,
            "usage_spike_min_calls": 100,
            "error_rate_pct": 5.0,
            "error_rate_min_calls": 20,
        }
        rules = {"quota_levels": [100], "low_balance_micros": 500, "wallet_resumed": False}
        put = await s.http.put("/v1/admin/alert-rules", json=rules, headers=ADMIN)
        assert put.status_code == 200 and put.json()["quota_levels"] == [100]
        for bad, field in (
            ({"quota_levels": [75]}, "quota_levels"),
            ({"low_balance_micros": 0}, "low_balance_micros"),
            ({"quota_levels": "all"}, "quota_levels"),
            ({"usage_spike_pct": 100}, "usage_spike_pct"),
            ({"error_rate_pct": 100}, "error_rate_pct"),
            ({"error_rate_min_calls": 0}, "error_rate_min_calls"),
            ({"drift_threshold_pct": 101}, "drift_threshold_pct"),
            ({"tenant": ""}, "tenant"),
        ):
            refused = await s.http.put("/v1/admin/alert-rules", json=bad, headers=ADMIN)
            assert (refused.status_code, refused.json()["error"].get("field")) == (400, field), refused.text
        assert (await s.http.get("/v1/admin/alert-rules", headers=ADMIN)).json()["low_balance_micros"] == 500
        viewer_put = await s.http.put(
            "/v1/admin/alert-rules", json={}, headers={"Authorization": "Bearer nope-nope-nope-nope"}
        )
        assert viewer_put.status_code == 401

        await seed(s.http, windows={"day": 10}, price=100, balance=1_000, consumer_id="c1")
        answers = await asyncio.gather(*(s.decide("c1") for _ in range(40)))
        assert sum(a["allow"] for a in answers) == 10
        await Reconciler(s.settings, s.store).run_once()
        fired = await s.db.fetch("SELECT type, data FROM alerts ORDER BY id")
        types = Counter(r["type"] for r in fired)
        # 100% only (80 and 90 are off); the balance crossed 500 and 0 once; the hold fired.
        assert types == {"quota.threshold": 1, "balance.low": 1, "balance.zero": 1, "wallet.empty": 1}
        low = next(msgspec.json.decode(r["data"]) for r in fired if r["type"] == "balance.low")
        assert (low["threshold"], low["balance"]) == (500, 0) and low["balance_before"] >= 500

        # A top-up lifts the hold (wallet.resumed is off); spending again crosses again.
        top = await s.http.post("/v1/admin/consumers/c1/topup", json={"amount": 1_000}, headers=ADMIN)
        assert top.status_code == 200
        await Reconciler(s.settings, s.store).run_once()
        await s.http.put("/v1/admin/plans/plan", json={"windows": {"day": 100}, "price": 100}, headers=ADMIN)
        answers = await asyncio.gather(*(s.decide("c1") for _ in range(30)))
        assert sum(a["allow"] for a in answers) == 10
        await Reconciler(s.settings, s.store).run_once()
        types = Counter(r["type"] for r in await s.db.fetch("SELECT type FROM alerts"))
        assert types == {"quota.threshold": 1, "balance.low": 2, "balance.zero": 2, "wallet.empty": 2}


async def test_a_slow_receiver_holds_only_its_own_deliveries(migrated_database, redis_url, prefix):
    slow, fast = Receiver().start(), Receiver().start()
    slow.delay_s = 2.0
    async with stack(migrated_database, redis_url, prefix, secret_keys=KEYS) as s:
        await _webhook(s.http, "slow", slow.url, QUOTA)
        await _webhook(s.http, "fast", fast.url, QUOTA)
        await seed(s.http, windows={"day": 10}, consumer_id="c1")
        answers = await asyncio.gather(*(s.decide("c1") for _ in range(10)))
        assert all(a["allow"] for a in answers)
        await Reconciler(s.settings, s.store).run_once()
        dispatcher = Dispatcher(s.db, SecretBox(KEYS), RetryPolicy(), timeout_s=10, concurrency=4)
        stop = asyncio.Event()
        running = asyncio.create_task(dispatcher.run(stop, poll_s=0.05))
        try:
            await until(lambda: len(fast.messages()) == 3, 10, "the fast receiver's three deliveries")
            # Meanwhile the slow one is still answering its first.
            assert len(slow.messages()) == 0
            await until(lambda: len(slow.messages()) == 3, 20, "the slow receiver's three deliveries")
        finally:
            stop.set()
            await running
            await dispatcher.close()
            slow.stop()
            fast.stop()
        levels = [msgspec.json.decode(m.body)["data"]["data"]["level"] for m in slow.messages()]
        assert levels == [80, 90, 100]  # in order, one at a time
