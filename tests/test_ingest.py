"""Usage ingestion: Kong HTTP Log payloads and Apigee analytics, authenticated,
validated whole, deduplicated, bounded; and the Apigee stats poller."""

from __future__ import annotations

import asyncio
import copy
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from sidecar.http.app import create_app
from sidecar.store.base import Store
from sidecar.store.redis_store import RedisStore
from tests.conftest import DEPLOYMENTS, make_settings
from tests.test_api import redis_keys

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SECRET = "ingest-secret-0123456789"
AUTH = {"X-Aforo-Ingest-Secret": SECRET}
KONG_LOGS = json.loads((FIXTURES / "kong_http_log.json").read_text())


@pytest.fixture
def ingest_settings(settings):
    import msgspec

    return msgspec.structs.replace(settings, ingest_secrets={"default": SECRET, "acme": SECRET + "-acme"})


@pytest.fixture
async def ingest_client(ingest_settings, store):
    app = create_app(ingest_settings, store)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sidecar") as http:
        yield http


async def _all_events(store: Store) -> list:
    events = []
    for consumer in (
        "7c9e6679-7425-40de-944b-e07fc1f90ae7",
        "anonymous",
        "app-acme-mobile",
        "app-globex-web",
    ):
        events += await store.events("default", consumer)
    return events


# --- Kong HTTP Log -------------------------------------------------------------------


async def test_a_kong_batch_is_mapped_and_stored_once_when_posted_three_times(ingest_client, store):
    answers = [
        await ingest_client.post("/integrations/kong/ingest", json=KONG_LOGS, headers=AUTH) for _ in range(3)
    ]
    assert [a.status_code for a in answers] == [202, 202, 202]
    assert [a.json() for a in answers] == [
        {"accepted": 3, "duplicates": 0},
        {"accepted": 0, "duplicates": 3},
        {"accepted": 0, "duplicates": 3},
    ]
    consumer = "7c9e6679-7425-40de-944b-e07fc1f90ae7"
    paid = sorted(await store.events("default", consumer), key=lambda e: e.started_at_ms)
    assert [(e.method, e.route, e.service, e.status) for e in paid] == [
        ("POST", "payments-route", "payments-api", 201),
        ("GET", "payments-route", "payments-api", 200),
    ]
    first, second = paid
    assert first.request_id == "5f2a0c3b1e6d4a7f8b9c0d1e2f3a4b5c"
    assert (first.request_size, first.response_size) == (312, 934)  # sizes sent as strings
    assert (first.latency_ms, first.upstream_latency_ms, first.gateway_latency_ms) == (41, 38, 3)
    assert first.started_at_ms == 1795420800010
    # No request id in the second log: a stable fingerprint stands in.
    assert second.request_id.startswith("fp-") and (second.request_size, second.response_size) == (190, 612)
    # The log without a consumer is kept, under "anonymous".
    (probe,) = await store.events("default", "anonymous")
    assert (probe.route, probe.status) == ("status-route", 200)


async def test_only_allow_listed_headers_are_kept(ingest_client, store):
    await ingest_client.post("/integrations/kong/ingest", json=KONG_LOGS[0], headers=AUTH)
    (event,) = await store.events("default", "7c9e6679-7425-40de-944b-e07fc1f90ae7")
    assert event.headers == {
        "accept": "application/json",
        "user-agent": "curl/8.5.0",
        "content-type": "application/json",
    }
    stored = json.dumps([event.__struct_fields__, [getattr(event, f) for f in event.__struct_fields__]])
    assert "super-secret-token" not in stored and "session=abc123" not in stored


async def test_the_consumer_field_is_configurable(ingest_settings, store):
    import msgspec

    settings = msgspec.structs.replace(ingest_settings, kong_consumer_field="custom_id")
    app = create_app(settings, store)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://s") as http:
        assert (
            await http.post("/integrations/kong/ingest", json=KONG_LOGS[:2], headers=AUTH)
        ).status_code == 202
    assert len(await store.events("default", "app-acme-mobile")) == 2


@pytest.mark.parametrize(
    "headers",
    [{}, {"X-Aforo-Ingest-Secret": "wrong-secret-0123456789"}, {"X-Aforo-Tenant": "acme", **AUTH},
     {"X-Aforo-Tenant": "nobody", **AUTH}],
)  # fmt: skip
async def test_a_missing_or_wrong_secret_is_refused_and_nothing_is_stored(ingest_client, store, headers):
    for path, body in (
        ("/integrations/kong/ingest", KONG_LOGS),
        ("/integrations/apigee/ingest", _analytics()),
    ):
        response = await ingest_client.post(path, json=body, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"
    assert await _all_events(store) == []


def _broken(index: int, path: list[str], value: object) -> list:
    logs = copy.deepcopy(KONG_LOGS)
    target = logs[index]
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return logs


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        (b"[{", "malformed_json", None),
        (b'"a string"', "invalid_field", None),
        (_broken(1, ["response", "status"], "OK"), "invalid_log", "[1].response.status"),
        (_broken(2, ["request", "size"], -5), "invalid_log", "[2].request.size"),
        (_broken(0, ["latencies"], [1, 2]), "invalid_field", "[0].latencies"),
        (_broken(0, ["consumer", "id"], "has space"), "invalid_identifier", "[0].consumer_id"),
        ([1, 2], "invalid_field", "[0]"),
    ],
)
async def test_a_malformed_payload_is_refused_whole(ingest_client, store, body, code, field):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = await ingest_client.post("/integrations/kong/ingest", content=content, headers=AUTH)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    if field is not None:
        assert error["field"] == field
    assert await _all_events(store) == []


async def test_an_oversized_batch_is_refused_with_413(ingest_settings, store):
    import msgspec

    settings = msgspec.structs.replace(ingest_settings, ingest_max_events=2, ingest_max_body_bytes=4096)
    app = create_app(settings, store)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://s") as http:
        too_many = await http.post("/integrations/kong/ingest", json=KONG_LOGS, headers=AUTH)
        assert (too_many.status_code, too_many.json()["error"]["code"]) == (413, "batch_too_large")
        too_big = await http.post(
            "/integrations/kong/ingest", json=KONG_LOGS[:1] * 2 + [{"pad": "x" * 5000}], headers=AUTH
        )
        assert (too_big.status_code, too_big.json()["error"]["code"]) == (413, "body_too_large")
    assert await _all_events(store) == []


async def test_slow_redis_gets_503_not_an_unbounded_queue(private_redis, prefix):
    settings = make_settings(
        redis_url=private_redis.url,
        key_prefix=prefix,
        ingest_secrets={"default": SECRET},
        ingest_max_in_flight=5,
    )
    store = RedisStore(private_redis.url, prefix=prefix, socket_timeout_s=3)
    app = create_app(settings, store)
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://s", timeout=10
        ) as http:
            await http.post("/integrations/kong/ingest", json=KONG_LOGS[:1], headers=AUTH)  # connect, warm
            private_redis.freeze()
            try:
                slow = asyncio.create_task(
                    http.post("/integrations/kong/ingest", json=KONG_LOGS, headers=AUTH)
                )
                await asyncio.sleep(0.3)  # the first batch is now waiting on the frozen Redis
                refused = await http.post("/integrations/kong/ingest", json=KONG_LOGS, headers=AUTH)
                assert refused.status_code == 503
                assert refused.json()["error"]["code"] == "ingest_busy"
                assert refused.headers["Retry-After"] == "1"
            finally:
                private_redis.thaw()
            assert (await slow).status_code in (202, 503)
            # Room again once the slow batch is done.
            again = await http.post("/integrations/kong/ingest", json=KONG_LOGS, headers=AUTH)
            assert again.status_code == 202
    finally:
        await store.close()


# --- Apigee analytics ----------------------------------------------------------------


def _analytics(hours_ago: float = 1, **overrides) -> dict:
    end = time.time() - hours_ago * 3600
    metric = {
        "apiProduct": "premium",
        "developerApp": "app-acme-mobile",
        "developer": "dev@acme.example",
        "proxy": "payments-v1",
        "messageCount": 120,
        "totalResponseTime": 5400,
        "responseSize": 90000,
        "errorCount": 3,
        **overrides,
    }
    return {
        "organization": "acme",
        "environment": "prod",
        "timeRange": {"start": int((end - 3600) * 1000), "end": int(end * 1000)},
        "metrics": [
            metric,
            {
                **metric,
                "developerApp": "app-globex-web",
                "apiProduct": "basic",
                "messageCount": 7,
                "errorCount": 0,
            },
        ],
    }


async def test_apigee_analytics_are_deduplicated_per_window_app_product_proxy(ingest_client, store):
    payload = _analytics()
    first = await ingest_client.post("/integrations/apigee/ingest", json=payload, headers=AUTH)
    assert first.json() == {"status": "ok", "recordsProcessed": 2, "recordsSkipped": 0}
    again = await ingest_client.post("/integrations/apigee/ingest", json=payload, headers=AUTH)
    assert again.json() == {"status": "ok", "recordsProcessed": 0, "recordsSkipped": 2}
    (event,) = await store.events("default", "app-acme-mobile")
    assert (event.count, event.errors, event.product, event.service, event.route) == (
        120,
        3,
        "premium",
        "payments-v1",
        "prod",
    )
    assert (event.latency_ms, event.response_size) == (5400, 90000)
    # Another window of the same app, product and proxy is a different record.
    later = await ingest_client.post(
        "/integrations/apigee/ingest", json=_analytics(hours_ago=0.5), headers=AUTH
    )
    assert later.json()["recordsProcessed"] == 2


async def test_late_apigee_data_up_to_24h_is_accepted_and_older_is_skipped(ingest_client, store):
    ok = await ingest_client.post(
        "/integrations/apigee/ingest", json=_analytics(hours_ago=23.5), headers=AUTH
    )
    assert ok.json()["recordsProcessed"] == 2
    late = await ingest_client.post(
        "/integrations/apigee/ingest", json=_analytics(hours_ago=25), headers=AUTH
    )
    assert late.json() == {"status": "ok", "recordsProcessed": 0, "recordsSkipped": 2}
    assert len(await store.events("default", "app-acme-mobile")) == 1


@pytest.mark.parametrize("backend", DEPLOYMENTS)
async def test_an_apigee_bucket_is_remembered_for_its_whole_late_data_window(ingest_client, store):
    """apigee-pull re-reads the last 24 h: a bucket ingested again hours later (not only
    within event_dedupe_ttl_seconds when shorter) is skipped, so it is never recorded twice."""
    assert isinstance(store, RedisStore)
    payload = _analytics(hours_ago=2)
    first = await ingest_client.post("/integrations/apigee/ingest", json=payload, headers=AUTH)
    assert first.json()["recordsProcessed"] == 2
    markers = [k for k in await redis_keys(store) if ":e:" in k]
    assert len(markers) == 2
    for marker in markers:  # still remembered 24 h from now
        assert await store.client.pttl(marker) > 24 * 3_600_000
    again = await ingest_client.post("/integrations/apigee/ingest", json=payload, headers=AUTH)
    assert again.json() == {"status": "ok", "recordsProcessed": 0, "recordsSkipped": 2}
    assert len(await store.events("default", "app-acme-mobile")) == 1


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda p: p.pop("organization"), None),
        (lambda p: p["metrics"][0].update(messageCount="many"), None),
        (lambda p: p["metrics"][1].update(messageCount=-1), "metrics[1].messageCount"),
        (lambda p: p["metrics"][0].update(errorCount=500), "metrics[0].errorCount"),
        (lambda p: p["metrics"][0].update(developerApp="has space"), "metrics[0].developerApp"),
        (lambda p: p["timeRange"].update(end=p["timeRange"]["start"]), "timeRange.end"),
        (lambda p: p["timeRange"].update(start="yesterday"), "timeRange.start"),
    ],
)
async def test_malformed_apigee_payloads_are_refused_whole(ingest_client, store, mutate, field):
    payload = _analytics()
    mutate(payload)
    response = await ingest_client.post("/integrations/apigee/ingest", json=payload, headers=AUTH)
    assert response.status_code == 400, response.text
    if field:
        assert response.json()["error"]["field"] == field
    assert await _all_events(store) == []


# --- the poller against a stub of Apigee's stats API ---------------------------------


class StubApigee(http.server.BaseHTTPRequestHandler):
    """Serves the recorded stats response; the first call (every call when
    ``always_limited``) is rate limited."""

    calls: list[str] = []
    always_limited = False

    def do_GET(self) -> None:
        StubApigee.calls.append(self.path)
        if len(StubApigee.calls) == 1 or StubApigee.always_limited:
            self.send_response(429)
            self.send_header("Retry-After", "0.2")
            self.end_headers()
            return
        recorded = json.loads((FIXTURES / "apigee_stats.json").read_text())
        base = StubApigee.base_ms
        for environment in recorded["environments"]:
            for dimension in environment["dimensions"]:
                for metric in dimension["metrics"]:
                    for point in metric["values"]:
                        point["timestamp"] += base
        body = json.dumps(recorded).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        return None


def test_apigee_pull_backs_off_and_ingests_each_bucket_once(redis_url, prefix, start_sidecar):
    sidecar = start_sidecar(
        {
            "AFORO_REDIS_URL": redis_url,
            "AFORO_KEY_PREFIX": prefix,
            "AFORO_INGEST_SECRETS": f"default={SECRET}",
        }
    )
    StubApigee.calls = []
    StubApigee.base_ms = (int(time.time()) // 3600 - 3) * 3_600_000
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StubApigee)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        command = [
            sys.executable, "-m", "sidecar.cli", "apigee-pull", "--apigee-url", f"http://127.0.0.1:{server.server_port}",
            "--org", "acme", "--env", "prod", "--token", "t0ken", "--sidecar-url", sidecar.url,
            "--ingest-secret", SECRET,
        ]  # fmt: skip
        first = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert first.returncode == 0, first.stderr
        assert "apigee answered 429" in first.stderr
        assert "2 buckets, 3 records processed, 0 skipped" in first.stdout
        path = StubApigee.calls[-1]
        assert path.startswith(
            "/v1/organizations/acme/environments/prod/stats/apiproxy,developer_app,api_product?"
        )
        assert "sum%28message_count%29" in path and "timeUnit=hour" in path
        # Again, the secret from the variable the sidecar reads: AFORO_INGEST_SECRETS.
        flagless = command[: command.index("--ingest-secret")]
        env = {**os.environ, "AFORO_INGEST_SECRETS": f"other=x,default={SECRET}"}
        second = subprocess.run(flagless, capture_output=True, text=True, timeout=60, env=env)
        assert "2 buckets, 0 records processed, 3 skipped" in second.stdout, second.stderr
    finally:
        server.shutdown()


def test_apigee_pull_gives_up_after_its_attempts_and_posts_nothing(redis_url, prefix, start_sidecar):
    sidecar = start_sidecar(
        {
            "AFORO_REDIS_URL": redis_url,
            "AFORO_KEY_PREFIX": prefix,
            "AFORO_INGEST_SECRETS": f"default={SECRET}",
        }
    )
    StubApigee.calls, StubApigee.always_limited = [], True
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StubApigee)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        command = [
            sys.executable, "-m", "sidecar.cli", "apigee-pull", "--apigee-url", f"http://127.0.0.1:{server.server_port}",
            "--org", "acme", "--env", "prod", "--sidecar-url", sidecar.url, "--ingest-secret", SECRET,
            "--attempts", "3",
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    finally:
        StubApigee.always_limited = False
        server.shutdown()
    assert result.returncode == 1
    assert len(StubApigee.calls) == 3
    assert "apigee stats query failed: 429" in result.stderr
