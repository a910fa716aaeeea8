"""The gRPC side: Sidecar service, Envoy's RateLimitService, health, reflection,
deadlines. Real grpc.aio servers and clients over TCP, real stores."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator

import grpc
import httpx
import msgspec
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from sidecar.config import Settings
from sidecar.grpc.errors import ERROR_CODE_KEY, ERROR_FIELD_KEY
from sidecar.grpc.gen.aforo.sidecar.v1 import sidecar_pb2 as pb
from sidecar.grpc.gen.aforo.sidecar.v1 import sidecar_pb2_grpc as pb_grpc
from sidecar.grpc.gen.envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from sidecar.grpc.gen.envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from sidecar.grpc.server import grpc_server
from sidecar.http.app import create_app
from sidecar.store.base import Store
from tests.conftest import ADMIN, make_settings, seed

OK = rls_pb2.RateLimitResponse.Code.OK
OVER_LIMIT = rls_pb2.RateLimitResponse.Code.OVER_LIMIT


class Sidecar:
    """One process's transports over one store: an HTTP client and a gRPC channel."""

    def __init__(self, http: httpx.AsyncClient, channel: grpc.aio.Channel, store: Store) -> None:
        self.http = http
        self.channel = channel
        self.store = store
        self.stub = pb_grpc.SidecarStub(channel)
        self.rls = rls_pb2_grpc.RateLimitServiceStub(channel)


@contextlib.asynccontextmanager
async def running(settings: Settings, store: Store) -> AsyncIterator[Sidecar]:
    # Port 0: the server binds a free port (build_app reads 0 as "off"; this bypasses it).
    settings = msgspec.structs.replace(settings, grpc_port=0)
    app = create_app(settings, store)
    async with (
        grpc_server(settings, app.state.authorizer, store) as port,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sidecar") as http,
        grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
    ):
        yield Sidecar(http, channel, store)


@pytest.fixture
async def sidecar(settings: Settings, store: Store) -> AsyncIterator[Sidecar]:
    async with running(settings, store) as running_sidecar:
        yield running_sidecar


def descriptor(**entries: str) -> ratelimit_pb2.RateLimitDescriptor:
    return ratelimit_pb2.RateLimitDescriptor(
        entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries.items()]
    )


async def invalid(call) -> tuple[str, str | None, str]:
    """Run a call expected to fail INVALID_ARGUMENT; return (code, field, details)."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    trailers = dict(error.trailing_metadata() or ())
    return trailers.get(ERROR_CODE_KEY), trailers.get(ERROR_FIELD_KEY), error.details()


# --- parity with HTTP --------------------------------------------------------------


async def _seed_tenant(http: httpx.AsyncClient, tenant: str) -> None:
    await seed(http, tenant=tenant, plan_id="quota", windows={"minute": 1000, "day": 12}, consumer_id="q")
    await seed(http, tenant=tenant, plan_id="paid", price=50_000, balance=1_000_000, consumer_id="w")
    await seed(http, tenant=tenant, plan_id="free", windows={"day": 10}, consumer_id="s")
    await seed(http, tenant=tenant, plan_id="narrow", products=["only-this"], consumer_id="n")
    suspended = await http.post(
        f"/v1/admin/consumers/s/suspend?tenant={tenant}", json={"tenant": tenant}, headers=ADMIN
    )
    assert suspended.status_code == 200


def _mixed_requests() -> list[dict]:
    """200 requests: allowed, over quota, over wallet, suspended, unknown, bad input."""
    kinds = [
        {"consumer_id": "q", "product": "api"},
        {"consumer_id": "w", "product": "api", "operation": "POST /pay"},
        {"consumer_id": "w", "product": "api", "cost": 10_000},
        {"consumer_id": "s", "product": "api"},
        {"consumer_id": "ghost", "product": "api"},
        {"consumer_id": "n", "product": "other"},
        {"consumer_id": "q", "product": "api", "cost": -5},  # bad: negative cost
        {"consumer_id": "", "product": "api"},  # bad: empty consumer
        {"product": "api"},  # bad: no consumer
        {"consumer_id": "q", "product": "api", "hits": 0},  # bad: hits
        {"consumer_id": "q", "product": "api", "request_id": "dup-1"},  # replayed after the first
    ]
    return [kinds[i % len(kinds)] for i in range(200)]


def _http_view(status: int, body: dict) -> tuple:
    if "error" in body:
        return ("error", status, body["error"]["code"], body["error"].get("field"))
    windows = tuple((w["window"], w["limit"], w["remaining"]) for w in body["windows"])
    return (
        body["reason"],
        status,
        body["allow"],
        windows,
        body["balance"],
        body["charged"],
        body["replayed"],
    )


def _grpc_view(decision: pb.Decision) -> tuple:
    windows = tuple((w.window, w.limit, w.remaining) for w in decision.windows)
    balance = decision.balance if decision.HasField("balance") else None
    return (
        decision.reason,
        decision.status,
        decision.allow,
        windows,
        balance,
        decision.charged,
        decision.replayed,
    )


async def test_http_and_grpc_give_identical_decisions(sidecar: Sidecar):
    for tenant in ("http", "grpc"):
        await _seed_tenant(sidecar.http, tenant)
    http_views, grpc_views = [], []
    for body in _mixed_requests():
        response = await sidecar.http.post("/v1/authorize", json={**body, "tenant": "http"})
        http_views.append(_http_view(response.status_code, response.json()))
        try:
            decision = await sidecar.stub.Authorize(pb.AuthorizeRequest(tenant="grpc", **body))
            grpc_views.append(_grpc_view(decision))
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            trailers = dict(error.trailing_metadata() or ())
            grpc_views.append(("error", 400, trailers[ERROR_CODE_KEY], trailers.get(ERROR_FIELD_KEY)))
    assert grpc_views == http_views
    reasons = Counter(view[0] for view in http_views)
    # Every kind of outcome is represented.
    assert {"ok", "quota_exceeded", "insufficient_balance", "suspended", "unknown_consumer"} <= set(reasons)
    assert {"product_not_allowed", "error"} <= set(reasons)
    assert reasons["error"] == sum(1 for body in _mixed_requests() if _is_bad(body))


def _is_bad(body: dict) -> bool:
    return body.get("cost", 0) < 0 or body.get("consumer_id") in ("", None) or body.get("hits") == 0


# --- exactness over gRPC through two processes -------------------------------------


async def _grpc_hammer(targets: list[str], total: int, make_request) -> list[pb.Decision]:
    channels = [grpc.aio.insecure_channel(target) for target in targets]
    stubs = [pb_grpc.SidecarStub(channel) for channel in channels]
    remaining = iter(range(total))
    decisions: list[pb.Decision] = []

    async def client(n: int) -> None:
        for i in remaining:
            decisions.append(await stubs[(n + i) % len(stubs)].Authorize(make_request(), timeout=30))

    try:
        await asyncio.gather(*(client(n) for n in range(64)))
    finally:
        for channel in channels:
            await channel.close()
    return decisions


@pytest.mark.slow
async def test_1000_per_day_over_grpc_through_two_processes(redis_url, prefix, start_sidecar):
    env = {"AFORO_REDIS_URL": redis_url, "AFORO_KEY_PREFIX": prefix, "AFORO_DECISION_TIMEOUT_MS": "10000"}
    processes = [start_sidecar(env), start_sidecar(env)]
    async with httpx.AsyncClient(base_url=processes[0].url) as admin:
        await seed(admin, windows={"day": 1000}, consumer_id="c1")
    decisions = await _grpc_hammer(
        [p.grpc_target for p in processes], 1500, lambda: pb.AuthorizeRequest(consumer_id="c1", product="api")
    )
    assert Counter((d.reason, d.status) for d in decisions) == {
        ("ok", 200): 1000,
        ("quota_exceeded", 429): 500,
    }
    assert all(d.retry_after >= 1 for d in decisions if not d.allow)
    assert not any(d.degraded for d in decisions)
    async with grpc.aio.insecure_channel(processes[1].grpc_target) as channel:
        status = await pb_grpc.SidecarStub(channel).GetConsumerStatus(
            pb.ConsumerStatusRequest(consumer_id="c1")
        )
    assert dict(status.windows) == {"day": 1000}


@pytest.mark.slow
async def test_wallet_to_zero_over_grpc_through_two_processes(redis_url, prefix, start_sidecar):
    env = {"AFORO_REDIS_URL": redis_url, "AFORO_KEY_PREFIX": prefix, "AFORO_DECISION_TIMEOUT_MS": "10000"}
    processes = [start_sidecar(env), start_sidecar(env)]
    async with httpx.AsyncClient(base_url=processes[0].url) as admin:
        await seed(admin, price=50_000, balance=10_000_000, consumer_id="w1")
    decisions = await _grpc_hammer(
        [p.grpc_target for p in processes], 240, lambda: pb.AuthorizeRequest(consumer_id="w1", product="api")
    )
    assert Counter(d.reason for d in decisions) == {"ok": 200, "insufficient_balance": 40}
    assert sum(d.charged for d in decisions) == 10_000_000
    async with grpc.aio.insecure_channel(processes[0].grpc_target) as channel:
        status = await pb_grpc.SidecarStub(channel).GetConsumerStatus(
            pb.ConsumerStatusRequest(consumer_id="w1")
        )
    assert (status.balance, status.pending) == (0, 10_000_000)


# --- Envoy's rate limit service ----------------------------------------------------


async def test_should_rate_limit_ok_until_the_limit_then_over_limit(sidecar: Sidecar):
    await seed(sidecar.http, windows={"minute": 5, "day": 100}, consumer_id="envoy-user")
    request = rls_pb2.RateLimitRequest(
        domain="default",
        descriptors=[
            descriptor(remote_address="127.0.0.1"),  # not the sidecar's: answered OK
            descriptor(consumer="envoy-user", product="api", operation="GET /x"),
        ],
    )
    remaining = []
    for _ in range(5):
        response = await sidecar.rls.ShouldRateLimit(request)
        assert response.overall_code == OK
        assert [s.code for s in response.statuses] == [OK, OK]
        status = response.statuses[1]
        assert (status.current_limit.name, status.current_limit.requests_per_unit) == ("minute", 5)
        assert status.current_limit.unit == rls_pb2.RateLimitResponse.RateLimit.Unit.MINUTE
        remaining.append(status.limit_remaining)
        assert 0 < status.duration_until_reset.seconds <= 60
        headers = {h.key: h.value for h in response.request_headers_to_add}
        assert len(headers["x-aforo-decision-id"]) == 28
    assert remaining == [4, 3, 2, 1, 0]

    over = await sidecar.rls.ShouldRateLimit(request)
    assert over.overall_code == OVER_LIMIT
    assert [s.code for s in over.statuses] == [OK, OVER_LIMIT]
    status = over.statuses[1]
    assert (status.current_limit.name, status.limit_remaining) == ("minute", 0)
    assert 0 < status.duration_until_reset.seconds <= 60
    headers = {h.key: h.value for h in over.response_headers_to_add}
    assert headers["x-aforo-reason"] == "quota_exceeded"
    assert 1 <= int(headers["retry-after"]) <= 60
    # The window entry picks the status shown; the day window counted exactly 5.
    day = await sidecar.rls.ShouldRateLimit(
        rls_pb2.RateLimitRequest(
            domain="default", descriptors=[descriptor(consumer="envoy-user", product="api", window="day")]
        )
    )
    assert (day.statuses[0].current_limit.name, day.statuses[0].limit_remaining) == ("day", 95)


async def test_should_rate_limit_hits_addend_and_non_quota_denials(sidecar: Sidecar):
    await seed(sidecar.http, windows={"day": 10}, price=100, balance=250, consumer_id="c1")
    heavy = rls_pb2.RateLimitRequest(
        domain="default", descriptors=[descriptor(consumer="c1", product="api", cost="0")], hits_addend=4
    )
    first = await sidecar.rls.ShouldRateLimit(heavy)
    assert (first.overall_code, first.statuses[0].limit_remaining) == (OK, 6)
    priced = rls_pb2.RateLimitRequest(
        domain="default", descriptors=[descriptor(consumer="c1", product="api")]
    )
    assert (await sidecar.rls.ShouldRateLimit(priced)).overall_code == OK
    assert (await sidecar.rls.ShouldRateLimit(priced)).overall_code == OK
    broke = await sidecar.rls.ShouldRateLimit(priced)
    assert broke.overall_code == OVER_LIMIT
    assert {h.key: h.value for h in broke.response_headers_to_add}["x-aforo-reason"] == "insufficient_balance"
    status = await sidecar.stub.GetConsumerStatus(pb.ConsumerStatusRequest(consumer_id="c1"))
    assert (status.balance, dict(status.windows)) == (50, {"day": 6})


@pytest.mark.parametrize(
    ("entries", "code", "field"),
    [
        ({"consumer": "", "product": "api"}, "invalid_identifier", "consumer"),
        ({"consumer": "c1", "product": "api", "cost": "-5"}, "invalid_amount", "cost"),
        ({"consumer": "c1", "product": "api", "cost": "lots"}, "invalid_amount", "cost"),
        ({"consumer": "c1", "product": "api", "window": "fortnight"}, "unknown_window", "window"),
        ({"consumer": "c1"}, "invalid_request", "product"),
    ],
)
async def test_should_rate_limit_rejects_invalid_descriptors_and_changes_nothing(
    sidecar: Sidecar, entries, code, field
):
    await seed(sidecar.http, windows={"day": 10}, consumer_id="c1")
    good = descriptor(consumer="c1", product="api")
    request = rls_pb2.RateLimitRequest(domain="default", descriptors=[good, descriptor(**entries)])
    got_code, got_field, details = await invalid(sidecar.rls.ShouldRateLimit(request))
    assert (got_code, got_field) == (code, field)
    assert details
    # The valid descriptor before the bad one was not decided either.
    status = await sidecar.stub.GetConsumerStatus(pb.ConsumerStatusRequest(consumer_id="c1"))
    assert dict(status.windows) == {"day": 0}


async def test_invalid_domain_is_rejected(sidecar: Sidecar):
    request = rls_pb2.RateLimitRequest(
        domain="bad domain", descriptors=[descriptor(consumer="c", product="p")]
    )
    assert (await invalid(sidecar.rls.ShouldRateLimit(request)))[:2] == ("invalid_identifier", "domain")


# --- Sidecar service: invalid input, batches, usage, status ------------------------


@pytest.mark.parametrize(
    ("fields", "code", "field"),
    [
        ({"consumer_id": "", "product": "api"}, "invalid_identifier", "consumer_id"),
        ({"consumer_id": "c1", "product": "api", "cost": -1}, "invalid_amount", "cost"),
        ({"product": "api"}, "missing_consumer", "consumer_id"),
        ({"consumer_id": "c1", "product": "api", "hits": 0}, "invalid_request", "hits"),
        ({"consumer_id": "c1", "product": "api", "tenant": "a:b"}, "invalid_identifier", "tenant"),
    ],
)
async def test_authorize_rejects_invalid_requests_and_changes_nothing(sidecar: Sidecar, fields, code, field):
    await seed(sidecar.http, windows={"day": 10}, price=5, balance=100, consumer_id="c1")
    got_code, got_field, details = await invalid(sidecar.stub.Authorize(pb.AuthorizeRequest(**fields)))
    assert (got_code, got_field) == (code, field)
    assert field in details
    status = await sidecar.stub.GetConsumerStatus(pb.ConsumerStatusRequest(consumer_id="c1"))
    assert (dict(status.windows), status.balance) == ({"day": 0}, 100)
    assert await sidecar.store.usage("default", "c1") == []


async def test_authorize_batch_decides_each_item_independently(sidecar: Sidecar):
    await seed(sidecar.http, windows={"day": 3}, consumer_id="c1")
    items = [pb.AuthorizeRequest(consumer_id="c1", product="api") for _ in range(5)]
    items.insert(2, pb.AuthorizeRequest(consumer_id="c1", product="api", cost=-1))
    items.append(pb.AuthorizeRequest(consumer_id="nobody", product="api"))
    response = await sidecar.stub.AuthorizeBatch(pb.AuthorizeBatchRequest(requests=items))
    assert len(response.results) == 7
    kinds = [r.WhichOneof("result") for r in response.results]
    assert kinds == ["decision", "decision", "error", "decision", "decision", "decision", "decision"]
    assert (response.results[2].error.code, response.results[2].error.field) == ("invalid_amount", "cost")
    reasons = Counter(r.decision.reason for r in response.results if r.HasField("decision"))
    assert reasons == {"ok": 3, "quota_exceeded": 2, "unknown_consumer": 1}


async def test_authorize_batch_over_the_limit_is_rejected(sidecar: Sidecar):
    items = [pb.AuthorizeRequest(consumer_id="c1", product="api")] * 1001
    code, field, _ = await invalid(sidecar.stub.AuthorizeBatch(pb.AuthorizeBatchRequest(requests=items)))
    assert (code, field) == ("batch_too_large", "requests")


async def test_report_usage_counts_accepted_duplicates_and_rejected(sidecar: Sidecar):
    def event(i: int, **overrides) -> pb.UsageEvent:
        values = {
            "consumer_id": "c1",
            "request_id": f"req-{i}",
            "product": "api",
            "route": "r1",
            "service": "s1",
            "method": "GET",
            "status": 200,
            "latency_ms": 12,
            "request_size": 100 + i,
            "response_size": 2000,
            "headers": {"user-agent": "test"},
        }
        values.update(overrides)
        return pb.UsageEvent(**values)

    async def stream():
        for i in range(10):
            yield event(i)
        for i in range(3):  # resent: duplicates
            yield event(i)
        yield event(99, consumer_id="bad id")
        yield event(100, status=1000)

    ack = await sidecar.stub.ReportUsage(stream())
    assert (ack.accepted, ack.duplicates, ack.rejected) == (10, 3, 2)
    assert [(e.code, e.field) for e in ack.errors] == [
        ("invalid_identifier", "consumer_id"),
        ("invalid_request", "status"),
    ]
    stored = await sidecar.store.events("default", "c1")
    assert sorted(e.request_id for e in stored) == sorted(f"req-{i}" for i in range(10))
    assert {e.request_size for e in stored} == set(range(100, 110))
    again = await sidecar.stub.ReportUsage(stream())
    assert (again.accepted, again.duplicates, again.rejected) == (0, 13, 2)


async def test_get_consumer_status(sidecar: Sidecar):
    await seed(sidecar.http, windows={"hour": 7}, balance=1234, consumer_id="c1")
    await sidecar.stub.Authorize(pb.AuthorizeRequest(consumer_id="c1", product="api"))
    status = await sidecar.stub.GetConsumerStatus(pb.ConsumerStatusRequest(consumer_id="c1"))
    assert (status.id, status.plan_id, status.status, status.wallet_mode) == (
        "c1",
        "plan",
        "active",
        "prepaid",
    )
    assert (status.balance, dict(status.windows)) == (1234, {"hour": 1})
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await sidecar.stub.GetConsumerStatus(pb.ConsumerStatusRequest(consumer_id="nobody"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    code, field, _ = await invalid(
        sidecar.stub.GetConsumerStatus(pb.ConsumerStatusRequest(consumer_id="a b"))
    )
    assert (code, field) == ("invalid_identifier", "consumer_id")


# --- health, reflection, deadlines -------------------------------------------------


async def test_reflection_lists_the_services(sidecar: Sidecar):
    stub = reflection_pb2_grpc.ServerReflectionStub(sidecar.channel)

    async def ask():
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    async for answer in stub.ServerReflectionInfo(ask()):
        names = {s.name for s in answer.list_services_response.service}
        break
    assert {
        "aforo.sidecar.v1.Sidecar",
        "envoy.service.ratelimit.v3.RateLimitService",
        "grpc.health.v1.Health",
    } <= names


async def _health(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(service=service))).status


@pytest.mark.slow
async def test_health_follows_redis_and_deadlines_are_honoured(private_redis, prefix):
    from sidecar.store.redis_store import RedisStore

    settings = make_settings(
        redis_url=private_redis.url, decision_timeout_ms=2000, fail_mode="open", late_apply_margin_ms=100
    )
    store = RedisStore(private_redis.url, prefix=prefix, socket_timeout_s=5)
    try:
        async with running(settings, store) as sidecar:
            await seed(sidecar.http, windows={"day": 10}, consumer_id="c1")
            serving = health_pb2.HealthCheckResponse.SERVING
            assert await _health(sidecar.channel) == serving
            assert await _health(sidecar.channel, "aforo.sidecar.v1.Sidecar") == serving

            private_redis.freeze()
            # The caller's deadline (0.2 s) is shorter than the sidecar's (2 s).
            with pytest.raises(grpc.aio.AioRpcError) as late:
                await sidecar.stub.Authorize(
                    pb.AuthorizeRequest(consumer_id="c1", product="api"), timeout=0.2
                )
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            batch = pb.AuthorizeBatchRequest(
                requests=[pb.AuthorizeRequest(consumer_id="c1", product="api")] * 5
            )
            with pytest.raises(grpc.aio.AioRpcError) as late_batch:
                await sidecar.stub.AuthorizeBatch(batch, timeout=0.2)
            assert late_batch.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            deadline = asyncio.get_running_loop().time() + 5
            while await _health(sidecar.channel) == serving:
                assert asyncio.get_running_loop().time() < deadline, "health never turned NOT_SERVING"
                await asyncio.sleep(0.1)
            assert await _health(sidecar.channel, "envoy.service.ratelimit.v3.RateLimitService") != serving

            private_redis.thaw()
            deadline = asyncio.get_running_loop().time() + 5
            while await _health(sidecar.channel) != serving:
                assert asyncio.get_running_loop().time() < deadline, "health never came back"
                await asyncio.sleep(0.1)
            # The requests that ran out of time were not applied when Redis woke up.
            await asyncio.sleep(settings.breaker_cooldown_ms / 1000)
            status = await sidecar.stub.GetConsumerStatus(pb.ConsumerStatusRequest(consumer_id="c1"))
            assert dict(status.windows) == {"day": 0}
    finally:
        await store.close()


@pytest.mark.slow
async def test_sidecar_deadline_shorter_than_the_callers_applies_the_fail_mode(private_redis, prefix):
    from sidecar.store.redis_store import RedisStore

    store = RedisStore(private_redis.url, prefix=prefix)
    for mode, allow in (("open", True), ("closed", False)):
        settings = make_settings(
            redis_url=private_redis.url, decision_timeout_ms=50, fail_mode=mode, breaker_cooldown_ms=0
        )
        async with running(settings, store) as sidecar:
            await seed(sidecar.http, windows={"day": 10}, consumer_id=f"c-{mode}")
            private_redis.freeze()
            try:
                decision = await sidecar.stub.Authorize(
                    pb.AuthorizeRequest(consumer_id=f"c-{mode}", product="api"), timeout=2
                )
            finally:
                private_redis.thaw()
            assert (decision.allow, decision.degraded, decision.reason) == (allow, True, "store_unavailable")
            assert decision.status == (200 if allow else 503)
    await store.close()
