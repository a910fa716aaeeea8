"""In-process checks of the plugin's pure parts: config parsing as Kong sends it, and
the usage event built from a serialized Kong log (including older Kong's shapes)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from kong_plugin.aforo_authorize import Plugin
from kong_plugin.client import _chunks
from kong_plugin.schema import Config, ConfigError

KONG_KEYS = {"__plugin_id": str(uuid.uuid4()), "__key__": "plugins:aforo-authorize::::", "__seq__": 3}


def plugin(**config: Any) -> Plugin:
    return Plugin({"usage": False, **KONG_KEYS, **config})


def log_entry(**overrides: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "request": {
            "id": "kong-request-1",
            "method": "PUT",
            "size": "312",
            "headers": {"user-agent": "curl/8", "authorization": "REDACTED", "x-multi": ["a", "b"]},
        },
        "response": {"status": 201, "size": 455},
        "latencies": {"kong": 2, "proxy": 11, "request": 14.0, "receive": 0},
        "route": {"id": "r-1", "name": "orders-route"},
        "service": {"id": "s-1", "name": "orders"},
        "consumer": {"id": "c-uuid", "custom_id": "app-7", "username": "bob"},
        "authenticated_entity": {"id": "cred-9", "consumer_id": "c-uuid"},
        "started_at": 1_800_000_000_123,
        "source": "service",
    }
    entry.update(overrides)
    return entry


def test_config_as_kong_sends_it():
    config = Config.parse(
        {**KONG_KEYS, "timeout_ms": 50.0, "usage_headers": {}, "product": None, "cost_header": "X-Cost"}
    )
    assert config.timeout_ms == 50
    assert config.usage_headers == ()  # an empty Lua table may arrive as {}
    assert config.product is None and config.cost_header == "x-cost"
    assert config.fail_open


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ({"surprise": 1}, "surprise"),
        ({"fail_mode": "maybe"}, "fail_mode"),
        ({"hits": 0}, "hits"),
        ({"hits": True}, "hits"),
        ({"grpc_target": ""}, "grpc_target"),
        ({"tenant": "{x}"}, "tenant"),
        ({"product": "a b"}, "product"),
        ({"api_key_header": "bad header"}, "header"),
        ({"usage_headers": ["ok", ""]}, "usage_headers"),
    ],
)
def test_config_errors_name_the_field(raw, words):
    with pytest.raises(ConfigError, match=words):
        Config.parse(raw)


def test_event_from_a_serialized_log():
    event = plugin(usage_headers=["User-Agent", "x-multi", "authorization", "cookie"]).event(
        log_entry(), None
    )
    assert event == {
        "tenant": "default",
        "consumer_id": "c-uuid",
        "request_id": "kong-request-1",
        "product": "orders",
        "route": "orders-route",
        "service": "orders",
        "method": "PUT",
        "status": 201,
        "started_at_ms": 1_800_000_000_123,
        "latency_ms": 14,
        "upstream_latency_ms": 11,
        "gateway_latency_ms": 2,
        "request_size": 312,
        "response_size": 455,
        "decision_id": "",
        "headers": {"user-agent": "curl/8", "x-multi": "a, b"},
    }


@pytest.mark.parametrize(
    ("identity", "expected"),
    [("consumer_id", "c-uuid"), ("custom_id", "app-7"), ("username", "bob"), ("credential", "cred-9")],
)
def test_event_consumer_follows_the_identity_option(identity, expected):
    assert plugin(consumer_identity=identity).event(log_entry(), None)["consumer_id"] == expected


def test_event_edge_cases():
    p = plugin(product_from="route")
    # Kong before 3.5 has no request id; no upstream reached: proxy latency -1.
    old = log_entry(request={"method": "GET"}, latencies={"kong": 1, "proxy": -1, "request": "x"})
    event = p.event(old, None)
    assert len(event["request_id"]) == 32 and event["request_id"] != p.event(old, None)["request_id"]
    assert (event["upstream_latency_ms"], event["latency_ms"], event["request_size"]) == (0, 0, 0)
    assert event["product"] == "orders-route"
    # An unnamed route is named by its id.
    assert p.event(log_entry(route={"id": "r-1"}), None)["product"] == "r-1"
    # No consumer, no event (and no guess).
    assert p.event(log_entry(consumer=None), None) is None
    api = plugin(consumer_identity="api_key")
    assert api.event(log_entry(), None) is None
    handed = api.event(log_entry(), {"consumer_id": "c-9", "decision_id": "d-1"})
    assert (handed["consumer_id"], handed["decision_id"]) == ("c-9", "d-1")
    upstream = plugin(upstream_headers=True)
    tagged = log_entry(request={"id": "r", "headers": {"x-aforo-decision-id": "d-7"}})
    assert upstream.event(tagged, None)["decision_id"] == "d-7"


def test_event_header_limits():
    names = [f"h{i}" for i in range(40)]
    headers = {name: "v" * 5000 for name in names}
    event = plugin(usage_headers=names).event(log_entry(request={"id": "r", "headers": headers}), None)
    assert len(event["headers"]) == 32
    assert all(len(value) == 2048 for value in event["headers"].values())


def test_http_usage_batches_are_split_below_the_sidecar_limits():
    events = [{"consumer_id": "c", "request_id": f"r{i}", "headers": {"x": "v" * 1000}} for i in range(200)]
    chunks = _chunks(events)
    assert len(chunks) > 1
    assert all(len(chunk) <= 48 * 1024 for chunk in chunks)
    assert sum(chunk.count(b'"request_id"') for chunk in chunks) == 200
