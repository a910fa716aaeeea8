"""The decision port: the same answers as the main port, over a lean HTTP/1.1 server
(keep-alive, pipelining in order, bounded bodies, JSON errors)."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
import pytest

from sidecar.authorizer import Authorizer
from sidecar.core.clock import now_ms
from sidecar.core.models import Outcome
from sidecar.http.app import create_app
from sidecar.http.decision_server import decision_server
from sidecar.store.base import DecisionCall
from sidecar.store.redis_store import RedisStore
from tests.conftest import make_settings, seed

pytestmark = pytest.mark.slow


@pytest.fixture
def sidecar(redis_url, prefix, start_sidecar):
    return start_sidecar(
        {"AFORO_REDIS_URL": redis_url, "AFORO_KEY_PREFIX": prefix, "AFORO_MAX_BODY_BYTES": "4096"}
    )


def _comparable(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in ("decision_id", "request_id", "decisionId")}


async def test_answers_match_the_main_port(sidecar):
    """Twin consumers, one asked on each port, get the same answers step by step."""
    async with (
        httpx.AsyncClient(base_url=sidecar.url) as main,
        httpx.AsyncClient(base_url=sidecar.decision_url) as fast,
    ):
        for twin in ("main", "fast"):
            await seed(
                main,
                plan_id=f"p-{twin}",
                windows={"day": 3},
                price=50_000,
                balance=1_000_000,
                consumer_id=twin,
            )
        cases = [
            ("/v1/authorize", {"consumer_id": "{c}", "product": "api"}),
            ("/integrations/apigee/authorize", {"appId": "{c}", "apiProduct": "api", "estimatedCost": 0.05}),
            ("/v1/authorize", {"consumer_id": "{c}-ghost", "product": "api"}),
            ("/v1/authorize", {"consumer_id": "{c}", "product": "api", "cost": -1}),
            ("/integrations/apigee/authorize", {"appId": "{c}", "apiProduct": "api", "extra": 1}),
            ("/v1/authorize", {"consumer_id": "{c}", "product": "api"}),
            ("/v1/authorize", {"consumer_id": "{c}", "product": "api"}),  # over the 3/day
        ]
        for path, template in cases:
            answers = []
            for client, twin in ((main, "main"), (fast, "fast")):
                body = json.loads(json.dumps(template).replace("{c}", twin))
                response = await client.post(path, json=body)
                text = response.text.replace(f'"{twin}', '"TWIN')
                answers.append(
                    (response.status_code, response.headers.get("retry-after"), _comparable(json.loads(text)))
                )
            assert answers[0] == answers[1], (path, template)
        assert answers[1][0] == 429 and int(answers[1][1]) >= 1


async def test_errors_are_json_with_the_right_status(sidecar):
    async with httpx.AsyncClient(base_url=sidecar.decision_url) as fast:
        bad = await fast.post("/v1/authorize", content=b"{nope")
        assert (bad.status_code, bad.json()["error"]["code"]) == (400, "malformed_json")
        big = await fast.post("/v1/authorize", content=b"{" + b" " * 5000 + b"}")
        assert (big.status_code, big.json()["error"]["code"]) == (413, "body_too_large")
        missing = await fast.post("/v1/admin/plans/x", json={})
        assert (missing.status_code, missing.json()["error"]["code"]) == (404, "not_found")
        wrong = await fast.get("/v1/authorize")
        assert (wrong.status_code, wrong.json()["error"]["code"]) == (405, "method_not_allowed")
        health = await fast.get("/healthz")
        assert health.json() == {"status": "ok"}


def _read_responses(sock: socket.socket, count: int) -> list[tuple[int, dict]]:
    """Read ``count`` HTTP/1.1 responses (content-length framed) off a socket."""
    data = b""
    responses = []
    while len(responses) < count:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, "connection closed early"
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        length = next(int(line.split(":")[1]) for line in lines if line.lower().startswith("content-length"))
        while len(rest) < length:
            rest += sock.recv(65536)
        responses.append((int(lines[0].split()[1]), json.loads(rest[:length])))
        data = rest[length:]
    return responses


async def test_pipelined_requests_are_answered_in_order(sidecar):
    async with httpx.AsyncClient(base_url=sidecar.url) as main:
        await seed(main, windows={"day": 1000}, consumer_id="c1")
    port = int(sidecar.decision_url.rsplit(":", 1)[1])
    bodies = [
        json.dumps({"consumer_id": "c1", "product": "api", "request_id": f"r-{i}"}).encode()
        for i in range(20)
    ]
    bodies[7] = b"{broken"
    requests = b"".join(
        b"POST /v1/authorize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
        for body in bodies
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(requests)  # all at once: pipelined on one connection
        responses = _read_responses(sock, 20)
    assert [status for status, _ in responses] == [200] * 7 + [400] + [200] * 12
    assert [body["request_id"] for status, body in responses if status == 200] == [
        f"r-{i}" for i in range(20) if i != 7
    ]
    # Connection: close is honoured.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        ((status, body),) = _read_responses(sock, 1)
        assert (status, body) == (200, {"status": "ok"})
        assert sock.recv(1) == b""  # closed by the server


class _BuggyStore(RedisStore):
    """Real Redis, with a bug injected for one consumer: its decisions raise."""

    def decide(self, call: DecisionCall) -> asyncio.Future[Outcome]:
        if call.consumer_id == "buggy":
            raise RuntimeError("injected bug")
        return super().decide(call)


async def _read_async(reader: asyncio.StreamReader, count: int) -> list[tuple[int, dict]]:
    responses = []
    for _ in range(count):
        head = (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
        length = next(int(line.split(":")[1]) for line in head if line.lower().startswith("content-length"))
        responses.append((int(head[0].split()[1]), json.loads(await reader.readexactly(length))))
    return responses


async def test_a_bug_is_a_json_500_and_the_requests_behind_it_keep_their_order(redis_url, prefix):
    settings = make_settings(redis_url=redis_url, key_prefix=prefix, decision_port=0)
    store = _BuggyStore(redis_url, prefix=prefix)
    await store.load_scripts()
    try:
        transport = httpx.ASGITransport(app=create_app(settings, store))
        async with httpx.AsyncClient(transport=transport, base_url="http://sidecar") as admin:
            await seed(admin, windows={"day": 10}, consumer_id="c1")
            await seed(admin, plan_id="p2", windows={"day": 10}, consumer_id="buggy")
        async with decision_server(settings, Authorizer(store, settings), store) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            bodies = [{"consumer_id": c, "product": "api"} for c in ("c1", "buggy", "c1")]
            writer.write(
                b"".join(
                    b"POST /v1/authorize HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%b"
                    % (len(body), body)
                    for body in (json.dumps(b).encode() for b in bodies)
                )
            )
            responses = await _read_async(reader, 3)
            writer.close()
        assert [status for status, _ in responses] == [200, 500, 200]
        assert responses[1][1]["error"]["code"] == "internal_error"
        assert [body["windows"][0]["remaining"] for _, body in (responses[0], responses[2])] == [9, 8]
        view = await store.get_consumer("default", "buggy", now_ms())
        assert view is not None and view.windows == {"day": 0}  # nothing applied
    finally:
        await store.close()
