"""The access phase through the real kong-pdk plugin server, driven by the Kong
emulator, against a real sidecar process on real Redis."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.kong.emulator import KongRequest
from tests.kong.harness import (
    Admin,
    PluginServer,
    Sidecar,
    closed_port,
    fresh_minute,
    module_sidecar,
    plugin_server,
    sidecar_config,
    unique,
)

# The last hands the decision id to the log phase for its usage event (usage is on).
DEFAULT_ACCESS_CALLS = [
    "kong.client.get_consumer",
    "kong.router.get_service",
    "kong.response.set_headers",
    "kong.ctx.shared.set",
]


@pytest.fixture(scope="module")
def sidecar(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    with module_sidecar(redis_url, str(tmp_path_factory.mktemp("sidecar")), "kong") as process:
        yield process


@pytest.fixture(scope="module")
def server() -> Iterator[PluginServer]:
    with plugin_server() as running:
        yield running


@pytest.fixture
def admin(sidecar: Sidecar) -> Admin:
    return sidecar.admin()


def consumer(consumer_id: str, **extra: str) -> dict[str, str]:
    return {"id": consumer_id, "username": f"user-{consumer_id}", "custom_id": f"app-{consumer_id}", **extra}


def test_five_per_minute_then_429_with_retry_after_and_rate_limit_headers(server, sidecar, admin):
    plan, cid = unique("plan"), unique("c")
    admin.plan(plan, {"minute": 5})
    admin.consumer(cid, plan)
    instance = server.kong.start_instance(sidecar_config(sidecar))
    fresh_minute()
    exchanges = [server.kong.play(instance, KongRequest(consumer=consumer(cid))) for _ in range(7)]

    allowed, denied = exchanges[:5], exchanges[5:]
    assert [e.proxied for e in exchanges] == [True] * 5 + [False] * 2
    assert [e.header("X-RateLimit-Remaining-Minute") for e in allowed] == ["4", "3", "2", "1", "0"]
    assert all(e.header("X-RateLimit-Limit-Minute") == "5" for e in exchanges)
    for e in allowed:
        assert e.status == 200
        assert e.access.methods == DEFAULT_ACCESS_CALLS
        # HandleEvent plus one step per PDK call.
        assert e.access.rpcs == 5
        assert 0 <= int(e.header("X-RateLimit-Reset-Minute")) <= 60
    for e in denied:
        assert e.status == 429
        assert e.access.methods == [
            "kong.client.get_consumer",
            "kong.router.get_service",
            "kong.response.exit",
        ]
        # kong.response.exit ends the event: no step answers it.
        assert e.access.rpcs == 3
        assert e.exit.body["reason"] == "quota_exceeded"
        assert e.exit.body["message"] == "API quota exceeded"
        retry_after = int(e.header("Retry-After"))
        assert 1 <= retry_after <= 60
        assert e.exit.body["retry_after"] == retry_after
        assert e.header("X-RateLimit-Remaining-Minute") == "0"
        assert e.header("Content-Type") == "application/json; charset=utf-8"
    assert admin.view(cid)["windows"]["minute"] == 5


def test_suspended_consumer_gets_403(server, sidecar, admin):
    plan, cid = unique("plan"), unique("c")
    admin.plan(plan, {"day": 100})
    admin.consumer(cid, plan)
    instance = server.kong.start_instance(sidecar_config(sidecar))
    assert server.kong.play(instance, KongRequest(consumer=consumer(cid))).proxied
    admin.suspend(cid)
    denied = server.kong.play(instance, KongRequest(consumer=consumer(cid)))
    assert (denied.status, denied.exit.body["reason"]) == (403, "suspended")
    assert denied.exit.body["decision_id"]
    assert denied.header("Retry-After") is None


def test_empty_wallet_gets_402_and_a_funded_one_shows_its_balance(server, sidecar, admin):
    plan, broke, funded = unique("plan"), unique("c"), unique("c")
    admin.plan(plan, {}, price=250_000)
    admin.consumer(broke, plan)
    admin.consumer(funded, plan, balance=1_000_000)
    instance = server.kong.start_instance(sidecar_config(sidecar))
    denied = server.kong.play(instance, KongRequest(consumer=consumer(broke)))
    assert (denied.status, denied.exit.body["reason"]) == (402, "insufficient_balance")
    assert denied.exit.body["message"] == "Insufficient balance"
    balances = [server.kong.play(instance, KongRequest(consumer=consumer(funded))) for _ in range(5)]
    assert [e.status for e in balances] == [200, 200, 200, 200, 402]
    assert [e.header("X-Aforo-Balance") for e in balances] == ["0.75", "0.5", "0.25", "0", "0"]


def test_unknown_and_missing_consumers(server, sidecar):
    instance = server.kong.start_instance(sidecar_config(sidecar))
    unknown = server.kong.play(instance, KongRequest(consumer=consumer(unique("ghost"))))
    assert (unknown.status, unknown.exit.body["reason"]) == (403, "unknown_consumer")
    # No authenticated consumer: refused without asking the sidecar (nothing to ask about).
    anonymous = server.kong.play(instance, KongRequest(consumer=None))
    assert (anonymous.status, anonymous.exit.body["reason"]) == (401, "missing_consumer")
    assert anonymous.access.methods == ["kong.client.get_consumer", "kong.response.exit"]


def _identified(identity: str, cid: str) -> tuple[str, KongRequest]:
    """The sidecar consumer id each identity option names, and a request carrying it."""
    kong_consumer = {"id": "5f1c2c9e-kong-uuid", "username": f"user-{cid}", "custom_id": f"app-{cid}"}
    if identity == "consumer_id":
        return cid, KongRequest(consumer={"id": cid})
    if identity == "custom_id":
        return f"app-{cid}", KongRequest(consumer=kong_consumer)
    if identity == "username":
        return f"user-{cid}", KongRequest(consumer=kong_consumer)
    credential = {"id": f"cred-{cid}", "consumer": {"id": kong_consumer["id"]}}
    return f"cred-{cid}", KongRequest(consumer=kong_consumer, credential=credential)


@pytest.mark.parametrize("identity", ["consumer_id", "custom_id", "username", "credential"])
def test_consumer_identity_options(server, sidecar, admin, identity):
    cid, plan = unique("c"), unique("plan")
    sidecar_id, request = _identified(identity, cid)
    admin.plan(plan, {"day": 2})
    admin.consumer(sidecar_id, plan)
    instance = server.kong.start_instance(
        sidecar_config(sidecar, consumer_identity=identity, product="catalog", balance_header=False)
    )
    exchanges = [server.kong.play(instance, request) for _ in range(3)]
    assert [e.status for e in exchanges] == [200, 200, 429]
    expected_read = "kong.client.get_credential" if identity == "credential" else "kong.client.get_consumer"
    assert exchanges[0].access.methods == [expected_read, "kong.response.set_headers", "kong.ctx.shared.set"]
    assert admin.view(sidecar_id)["windows"]["day"] == 2


def test_api_key_is_handed_to_the_sidecar_for_lookup(server, sidecar, admin):
    cid, plan = unique("c"), unique("plan")
    admin.plan(plan, {"day": 10})
    admin.consumer(cid, plan)
    key = admin.key(cid)
    instance = server.kong.start_instance(
        sidecar_config(sidecar, consumer_identity="api_key", api_key_header="X-Api-Key", product="catalog")
    )
    ok = server.kong.play(instance, KongRequest(headers={"X-API-KEY": key}))
    assert ok.proxied
    assert ok.access.methods == [
        "kong.request.get_header",
        "kong.response.set_headers",
        "kong.ctx.shared.set",
    ]
    assert ok.access.calls[0].args == ["x-api-key"]
    # The log phase learns who the key belongs to from the access phase.
    assert ok.ctx_shared["aforo"]["consumer_id"] == cid
    wrong = server.kong.play(instance, KongRequest(headers={"x-api-key": "A" * 40}))
    assert (wrong.status, wrong.exit.body["reason"]) == (401, "invalid_key")
    # Too short to be a key: the sidecar refuses the request itself (INVALID_ARGUMENT).
    short = server.kong.play(instance, KongRequest(headers={"x-api-key": "abc"}))
    assert (short.status, short.exit.body["reason"]) == (401, "invalid_key")
    missing = server.kong.play(instance, KongRequest())
    assert (missing.status, missing.exit.body["reason"]) == (401, "missing_consumer")
    assert admin.view(cid)["windows"]["day"] == 1


def test_product_from_service_route_or_config(server, sidecar, admin):
    cid, plan = unique("c"), unique("plan")
    admin.plan(plan, {"day": 100}, products=["catalog"])
    admin.consumer(cid, plan)
    by_service = server.kong.start_instance(sidecar_config(sidecar, product_from="service"))
    by_route = server.kong.start_instance(sidecar_config(sidecar, product_from="route"))
    configured = server.kong.start_instance(sidecar_config(sidecar, product="catalog"))
    request = KongRequest(consumer=consumer(cid))
    assert server.kong.play(by_service, request).proxied
    route_named = server.kong.play(by_route, KongRequest(consumer=consumer(cid)))
    assert (route_named.status, route_named.exit.body["reason"]) == (403, "product_not_allowed")
    assert route_named.access.methods[1] == "kong.router.get_route"
    unnamed_service = KongRequest(consumer=consumer(cid), service={"id": "catalog"})
    assert server.kong.play(by_service, unnamed_service).proxied  # an unnamed service is named by its id
    fixed = server.kong.play(configured, KongRequest(consumer=consumer(cid), service=None, route=None))
    assert fixed.proxied
    assert fixed.access.methods == [
        "kong.client.get_consumer",
        "kong.response.set_headers",
        "kong.ctx.shared.set",
    ]


def test_cost_fixed_or_from_a_header(server, sidecar, admin):
    cid, plan = unique("c"), unique("plan")
    admin.plan(plan, {}, price=1)
    admin.consumer(cid, plan, balance=10_000_000)
    fixed = server.kong.start_instance(sidecar_config(sidecar, product="catalog", cost=1_500_000))
    header = server.kong.start_instance(
        sidecar_config(sidecar, product="catalog", cost=1_500_000, cost_header="X-Call-Cost")
    )
    assert server.kong.play(fixed, KongRequest(consumer=consumer(cid))).header("X-Aforo-Balance") == "8.5"
    priced = server.kong.play(header, KongRequest(consumer=consumer(cid), headers={"x-call-cost": "250000"}))
    assert priced.header("X-Aforo-Balance") == "8.25"
    # Only one header is needed: read with get_header, not get_headers.
    assert priced.access.methods[:2] == ["kong.request.get_header", "kong.client.get_consumer"]
    absent = server.kong.play(header, KongRequest(consumer=consumer(cid)))
    assert absent.header("X-Aforo-Balance") == "6.75"
    for bad in ("abc", "-5", "1.5", "+5", "1_000", " 5", str(2**53)):
        refused = server.kong.play(header, KongRequest(consumer=consumer(cid), headers={"x-call-cost": bad}))
        assert (refused.status, refused.exit.body["reason"]) == (400, "invalid_cost"), bad
    assert admin.view(cid)["balance"] == 6_750_000


def test_api_key_and_cost_header_are_read_in_one_call(server, sidecar, admin):
    cid, plan = unique("c"), unique("plan")
    admin.plan(plan, {}, price=0)
    admin.consumer(cid, plan, balance=1_000_000)
    key = admin.key(cid)
    instance = server.kong.start_instance(
        sidecar_config(
            sidecar, consumer_identity="api_key", product="catalog", cost_header="x-cost", usage=False
        )
    )
    exchange = server.kong.play(instance, KongRequest(headers={"x-api-key": key, "x-cost": ["100000", "5"]}))
    assert exchange.access.methods == ["kong.request.get_headers", "kong.response.set_headers"]
    assert exchange.access.calls[0].step == "plugin.StepMultiMap"
    assert exchange.header("X-Aforo-Balance") == "0.9"


def test_upstream_headers_and_the_fewest_calls(server, sidecar, admin):
    cid, plan = unique("c"), unique("plan")
    admin.plan(plan, {"day": 100})
    admin.consumer(cid, plan)
    upstream = server.kong.start_instance(
        sidecar_config(sidecar, product="catalog", upstream_headers=True, rate_limit_headers=False)
    )
    exchange = server.kong.play(upstream, KongRequest(consumer=consumer(cid)))
    assert exchange.upstream_headers["X-Aforo-Consumer-Id"] == cid
    assert len(exchange.upstream_headers["X-Aforo-Decision-Id"]) > 10
    assert exchange.header("X-RateLimit-Limit-Day") is None
    # The upstream headers carry the decision id into the log: no hand-over needed.
    assert exchange.access.methods == [
        "kong.client.get_consumer",
        "kong.response.set_headers",
        "kong.service.request.set_headers",
    ]
    lean = server.kong.start_instance(
        sidecar_config(
            sidecar, product="catalog", rate_limit_headers=False, balance_header=False, usage=False
        )
    )
    minimal = server.kong.play(lean, KongRequest(consumer=consumer(cid)))
    assert minimal.proxied
    assert minimal.access.methods == ["kong.client.get_consumer"]
    assert minimal.access.rpcs == 2
    assert admin.view(cid)["windows"]["day"] == 2


def test_http_transport_and_fallback(server, sidecar, admin):
    cid, plan = unique("c"), unique("plan")
    admin.plan(plan, {"day": 3})
    admin.consumer(cid, plan)
    http_only = server.kong.start_instance(sidecar_config(sidecar, protocol="http", product="catalog"))
    # Nothing listens on this gRPC port: the plugin falls back to HTTP.
    with closed_port() as port:
        fallback = server.kong.start_instance(
            sidecar_config(sidecar, grpc_target=f"127.0.0.1:{port}", product="catalog")
        )
        statuses = [
            server.kong.play(http_only, KongRequest(consumer=consumer(cid))).status,
            server.kong.play(fallback, KongRequest(consumer=consumer(cid))).status,
            server.kong.play(fallback, KongRequest(consumer=consumer(cid))).status,
        ]
        no_fallback = server.kong.start_instance(
            sidecar_config(
                sidecar,
                grpc_target=f"127.0.0.1:{port}",
                http_fallback=False,
                fail_mode="closed",
                product="catalog",
            )
        )
        refused = server.kong.play(no_fallback, KongRequest(consumer=consumer(cid)))
    assert statuses == [200, 200, 200]
    assert (refused.status, refused.exit.body["reason"]) == (503, "sidecar_unavailable")
    over = server.kong.play(http_only, KongRequest(consumer=consumer(cid)))
    assert (over.status, over.exit.body["reason"]) == (429, "quota_exceeded")
    assert admin.view(cid)["windows"]["day"] == 3


def test_http_decisions_can_go_to_the_decision_port(server, sidecar, admin):
    cid, plan = unique("c"), unique("plan")
    admin.plan(plan, {"day": 5})
    admin.consumer(cid, plan)
    # http_url answers nothing here: a decision can only come from the decision port.
    with closed_port() as port:
        instance = server.kong.start_instance(
            sidecar_config(
                sidecar,
                protocol="http",
                http_url=f"http://127.0.0.1:{port}",
                decision_url=sidecar.decision_url,
                product="catalog",
                usage=False,
            )
        )
        exchanges = [server.kong.play(instance, KongRequest(consumer=consumer(cid))) for _ in range(6)]
    assert [e.header("X-RateLimit-Remaining-Day") for e in exchanges] == ["4", "3", "2", "1", "0", "0"]
    assert exchanges[-1].exit.body["reason"] == "quota_exceeded"


def test_many_requests_at_once_are_all_counted(server, sidecar, admin):
    """Kong runs many requests at once over many connections: every decision counts."""
    cid, plan = unique("c"), unique("plan")
    admin.plan(plan, {"day": 25})
    admin.consumer(cid, plan)
    instance = server.kong.start_instance(sidecar_config(sidecar, product="catalog"))
    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        statuses = list(
            pool.map(
                lambda _: server.kong.play(instance, KongRequest(consumer=consumer(cid))).status, range(40)
            )
        )
    assert time.monotonic() - started < 60
    assert sorted(statuses).count(200) == 25
    assert statuses.count(429) == 15
    assert admin.view(cid)["windows"]["day"] == 25
