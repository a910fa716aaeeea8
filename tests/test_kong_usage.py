"""The log phase: one usage event per proxied request reaches the sidecar, batched,
over gRPC or HTTP, kept through a sidecar outage, dropped (and counted) only when the
bounded queue is full. Each test runs its own plugin server and stops it, so the
counters it logs at shutdown are exact."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.kong.emulator import KongRequest, Upstream
from tests.kong.harness import Sidecar, plugin_server, sidecar_config, stored_events, wait_for_events


@pytest.fixture
def sidecar(redis_url: str, prefix: str, tmp_path) -> Iterator[Sidecar]:
    process = Sidecar(str(tmp_path), {"AFORO_REDIS_URL": redis_url, "AFORO_KEY_PREFIX": prefix})
    process.start()
    yield process
    process.stop()


def kong_consumer() -> dict[str, str]:
    return {"id": "c1", "username": "alice", "custom_id": "app-1"}


def test_n_proxied_requests_make_exactly_n_usage_events(sidecar, redis_url, prefix):
    admin = sidecar.admin()
    admin.plan("plan", {"day": 7})
    admin.consumer("c1", "plan")
    statuses = [200, 201, 204, 404, 500, 200, 302]
    with plugin_server() as server:
        instance = server.kong.start_instance(
            sidecar_config(
                sidecar, usage_headers=["User-Agent", "x-tier", "authorization"], upstream_headers=True
            )
        )
        proxied = []
        for i, status in enumerate(statuses):
            request = KongRequest(
                method="POST" if i % 2 else "GET",
                path=f"/catalog/items/{i}",
                consumer=kong_consumer(),
                body_size=100 * i,
                headers={
                    "user-agent": f"client/{i}",
                    "x-tier": ["gold", "silver"],
                    "authorization": "Bearer secret",
                    "x-not-listed": "private",
                },
            )
            proxied.append(server.kong.play(instance, request, Upstream(status=status, body_size=1000 + i)))
        denied = [server.kong.play(instance, KongRequest(consumer=kong_consumer())) for _ in range(2)]
        assert all(e.proxied for e in proxied)
        assert [e.status for e in denied] == [429, 429]
        # The upstream headers carry the decision id into the log: no hand-over to read.
        assert all(e.log.methods == ["kong.log.serialize"] for e in proxied + denied)

        events = wait_for_events(redis_url, prefix, "c1", len(statuses))
        assert server.stop() == 0
        stats = server.final_stats()

    events = stored_events(redis_url, prefix, "c1")
    assert len(events) == len(statuses)
    assert stats["accepted"] == 7 and stats["dropped"] == 0 and stats["lost"] == 0
    by_id = {e.request_id: e for e in events}
    for exchange in proxied:
        event = by_id[exchange.request.request_id]
        logged = exchange.serialized
        assert event.consumer_id == "c1"
        # Named, so the sidecar knows the call was charged by its decision (not rated).
        assert event.decision_id == exchange.upstream_headers["X-Aforo-Decision-Id"]
        assert (event.route, event.service, event.product) == ("catalog-route", "catalog", "catalog")
        assert event.method == exchange.request.method
        assert event.status == exchange.status
        assert event.request_size == logged["request"]["size"]
        assert event.response_size == logged["response"]["size"]
        assert event.upstream_latency_ms == 4
        assert event.latency_ms == logged["latencies"]["request"]
        assert event.gateway_latency_ms == logged["latencies"]["kong"]
        assert event.started_at_ms == logged["started_at"]
        assert event.decision_id == exchange.upstream_headers["X-Aforo-Decision-Id"]
        # Allow-listed headers only, secrets never, repeated values joined.
        assert event.headers == {
            "user-agent": exchange.request.headers["user-agent"],
            "x-tier": "gold, silver",
        }
    assert len({e.request_size for e in events}) == 7


@pytest.mark.parametrize("identity", ["custom_id", "username", "credential"])
def test_events_name_the_consumer_the_way_access_did(sidecar, redis_url, prefix, identity):
    sidecar_id = {"custom_id": "app-1", "username": "alice", "credential": "cred-1"}[identity]
    admin = sidecar.admin()
    admin.plan("plan", {"day": 10})
    admin.consumer(sidecar_id, "plan")
    with plugin_server() as server:
        instance = server.kong.start_instance(sidecar_config(sidecar, consumer_identity=identity))
        request = KongRequest(consumer=kong_consumer(), credential={"id": "cred-1"})
        assert server.kong.play(instance, request).proxied
        assert server.stop() == 0
    assert [e.request_id for e in stored_events(redis_url, prefix, sidecar_id)] == [request.request_id]


def test_api_key_events_carry_the_resolved_consumer_and_decision(sidecar, redis_url, prefix):
    admin = sidecar.admin()
    admin.plan("plan", {"day": 10})
    admin.consumer("c1", "plan")
    key = admin.key("c1")
    with plugin_server() as server:
        instance = server.kong.start_instance(sidecar_config(sidecar, consumer_identity="api_key"))
        exchange = server.kong.play(instance, KongRequest(headers={"x-api-key": key}))
        assert exchange.log.methods == ["kong.log.serialize", "kong.ctx.shared.get"]
        assert server.stop() == 0
    (event,) = stored_events(redis_url, prefix, "c1")
    assert event.decision_id == exchange.ctx_shared["aforo"]["decision_id"]
    assert "x-api-key" not in event.headers


def test_usage_goes_over_http_when_grpc_is_off(redis_url, prefix, tmp_path):
    process = Sidecar(str(tmp_path), {"AFORO_REDIS_URL": redis_url, "AFORO_KEY_PREFIX": prefix}, grpc=False)
    process.start()
    try:
        admin = process.admin()
        admin.plan("plan", {"day": 100})
        admin.consumer("c1", "plan")
        with plugin_server() as server:
            instance = server.kong.start_instance(
                sidecar_config(process, grpc_target="127.0.0.1:1", usage_batch_size=3)
            )
            exchanges = [server.kong.play(instance, KongRequest(consumer=kong_consumer())) for _ in range(8)]
            assert all(e.header("X-RateLimit-Remaining-Day") for e in exchanges)  # decided over HTTP
            assert server.stop() == 0
            stats = server.final_stats()
        assert len(stored_events(redis_url, prefix, "c1")) == 8
        assert stats["accepted"] == 8 and stats["batches"] >= 3
    finally:
        process.stop()


def test_a_full_queue_drops_new_events_and_counts_them(sidecar, redis_url, prefix):
    admin = sidecar.admin()
    admin.plan("plan", {"day": 100})
    admin.consumer("c1", "plan")
    with plugin_server() as server:
        # Batches never fill and the interval never passes: only shutdown sends.
        instance = server.kong.start_instance(
            sidecar_config(sidecar, usage_queue_size=5, usage_batch_size=1000, usage_flush_interval_ms=60_000)
        )
        exchanges = [server.kong.play(instance, KongRequest(consumer=kong_consumer())) for _ in range(12)]
        assert all(e.proxied for e in exchanges)
        assert stored_events(redis_url, prefix, "c1") == []
        assert server.stop() == 0
        stats = server.final_stats()
    assert (stats["enqueued"], stats["dropped"], stats["accepted"], stats["lost"]) == (5, 7, 5, 0)
    stored = [e.request_id for e in stored_events(redis_url, prefix, "c1")]
    assert stored == [e.request.request_id for e in exchanges[:5]]


def test_events_survive_a_sidecar_outage_and_arrive_once(sidecar, redis_url, prefix):
    admin = sidecar.admin()
    admin.plan("plan", {"day": 100})
    admin.consumer("c1", "plan")
    with plugin_server() as server:
        instance = server.kong.start_instance(
            sidecar_config(sidecar, timeout_ms=100, fail_mode="open", usage_flush_interval_ms=20)
        )
        before = [server.kong.play(instance, KongRequest(consumer=kong_consumer())) for _ in range(3)]
        wait_for_events(redis_url, prefix, "c1", 3)
        sidecar.stop()
        # Fail-open passes are proxied, so they are usage too.
        during = [server.kong.play(instance, KongRequest(consumer=kong_consumer())) for _ in range(4)]
        assert all(e.proxied for e in during)
        sidecar.start()
        events = wait_for_events(redis_url, prefix, "c1", 7)
        assert len(events) == 7
        assert server.stop() == 0
        stats = server.final_stats()
    assert len(stored_events(redis_url, prefix, "c1")) == 7
    assert {e.request_id for e in stored_events(redis_url, prefix, "c1")} == {
        e.request.request_id for e in before + during
    }
    assert stats["failures"] >= 1
    assert stats["accepted"] + stats["duplicates"] == 7 and stats["dropped"] == 0


def test_unsent_events_at_shutdown_are_counted_as_lost(redis_url, prefix, tmp_path):
    """The sidecar never comes back: shutdown gives up after its flush budget and says so."""
    with plugin_server() as server:
        instance = server.kong.start_instance(
            {
                "grpc_target": "127.0.0.1:1",
                "http_url": "http://127.0.0.1:1",
                "fail_mode": "open",
                "usage_flush_interval_ms": 20,
            }
        )
        for _ in range(4):
            assert server.kong.play(instance, KongRequest(consumer=kong_consumer())).proxied
        assert server.stop() == 0
        stats = server.final_stats()
    assert (stats["enqueued"], stats["accepted"], stats["lost"], stats["dropped"]) == (4, 0, 4, 0)
    assert stats["failures"] >= 1


def test_events_of_calls_the_plugin_decided_are_not_rated_again(sidecar, redis_url, prefix):
    """The sidecar rates an event no decision covered: the plugin's events must name the
    decision that charged the call, or every call would count and cost twice."""
    admin = sidecar.admin()
    admin.plan("priced", {"day": 100}, price=10_000)
    admin.consumer("c-rated", "priced", balance=1_000_000)
    with plugin_server() as server:
        instance = server.kong.start_instance(sidecar_config(sidecar, product="catalog"))
        exchanges = [server.kong.play(instance, KongRequest(consumer={"id": "c-rated"})) for _ in range(5)]
        assert all(e.proxied for e in exchanges)
        events = wait_for_events(redis_url, prefix, "c-rated", 5)
        assert server.stop() == 0
    decided = {e.ctx_shared["aforo"]["decision_id"] for e in exchanges}
    assert {e.decision_id for e in events} == decided and len(decided) == 5
    view = admin.view("c-rated")
    assert (view["windows"]["day"], view["balance"]) == (5, 1_000_000 - 5 * 10_000)
