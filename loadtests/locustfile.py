"""Locust users for the sidecar: HTTP POST /v1/authorize and gRPC Authorize, on a
realistic mix, with a P95 gate.

The data is seeded by the run itself through the admin API (a tenant of its own):
plans with roomy and tight quotas, prepaid consumers with and without money, some
suspended, some addressed by API key; a share of calls names consumers that do not
exist. Decisions of every kind (200, 402, 403, 429, 401) count as successes: they are
answers. Anything else (5xx, 400, timeouts) is a failure.

Headless, with the gate (exit code 1 when P95 is over budget or anything failed):

    locust -f loadtests/locustfile.py --headless -u 50 -r 25 -t 60s \\
        --host http://127.0.0.1:8081 --admin-url http://127.0.0.1:8080 \\
        --admin-token "$AFORO_ADMIN_TOKEN" --grpc-target 127.0.0.1:9090 \\
        --p95-budget-ms 50 --csv loadtest

--host is the decision port (the main port serves /v1/authorize too). Without
--headless, the same file runs in Locust's web UI.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import time
import uuid

import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()  # before any channel exists: grpc must cooperate with gevent

import grpc  # noqa: E402
import httpx  # noqa: E402
from locust import HttpUser, User, constant, events, task  # noqa: E402
from locust.env import Environment  # noqa: E402

from sidecar.grpc.gen.aforo.sidecar.v1 import sidecar_pb2 as pb  # noqa: E402
from sidecar.grpc.gen.aforo.sidecar.v1 import sidecar_pb2_grpc as pb_grpc  # noqa: E402

log = logging.getLogger("aforo.loadtest")
logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per seeding call is noise
ANSWERS = {200, 401, 402, 403, 429}  # decisions, not failures

# The population, by share: (consumer id prefix, plan, balance micros, suspended).
POPULATION = (
    ("pro", "lt-pro", 10**12, False, 70),
    ("free", "lt-free", 0, False, 15),
    ("broke", "lt-paid", 0, False, 10),
    ("banned", "lt-pro", 10**12, True, 5),
)
PLANS = {
    "lt-pro": {"windows": {"minute": 1_000_000, "day": 10**9}, "price": 1_000},
    "lt-free": {"windows": {"minute": 5, "day": 100}, "price": 0},
    "lt-paid": {"windows": {"day": 10**9}, "price": 1_000},
}
UNKNOWN_SHARE = 0.05


@events.init_command_line_parser.add_listener
def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--admin-url", default=os.environ.get("AFORO_ADMIN_URL", "http://127.0.0.1:8080"))
    parser.add_argument("--admin-token", default=os.environ.get("AFORO_ADMIN_TOKEN", ""))
    parser.add_argument("--grpc-target", default=os.environ.get("AFORO_GRPC_TARGET", "127.0.0.1:9090"))
    parser.add_argument("--p95-budget-ms", type=float, default=50.0, help="the gate: P95 must stay under")
    parser.add_argument("--consumers", type=int, default=200, help="consumers seeded by the run")
    parser.add_argument("--tenant", default="", help="tenant of the seeded data (default: a fresh one)")


class Population:
    """Who calls: consumer ids by kind, and the raw API keys of a few of them."""

    tenant = ""
    consumers: list[str] = []
    keys: list[str] = []

    @classmethod
    def pick(cls) -> dict[str, str]:
        if random.random() < UNKNOWN_SHARE:
            return {"consumer_id": f"ghost-{random.randrange(10**6)}"}
        if cls.keys and random.random() < 0.1:
            return {"api_key": random.choice(cls.keys)}
        return {"consumer_id": random.choice(cls.consumers)}


@events.test_start.add_listener
def _seed(environment: Environment, **_: object) -> None:
    options = environment.parsed_options
    tenant = options.tenant or f"lt-{uuid.uuid4().hex[:8]}"
    headers = {"Authorization": f"Bearer {options.admin_token}"}
    consumers: list[str] = []
    keys: list[str] = []
    with httpx.Client(base_url=options.admin_url, headers=headers, timeout=30) as admin:
        for plan_id, plan in PLANS.items():
            admin.put(f"/v1/admin/plans/{plan_id}", json={**plan, "tenant": tenant}).raise_for_status()
        index = 0
        for prefix, plan_id, balance, suspended, share in POPULATION:
            for _ in range(max(1, options.consumers * share // 100)):
                consumer = f"{prefix}-{index}"
                index += 1
                body = {"plan_id": plan_id, "tenant": tenant}
                admin.put(f"/v1/admin/consumers/{consumer}", json=body).raise_for_status()
                if balance:
                    topup = {"amount": balance, "tenant": tenant}
                    admin.post(f"/v1/admin/consumers/{consumer}/topup", json=topup).raise_for_status()
                if suspended:
                    admin.post(
                        f"/v1/admin/consumers/{consumer}/suspend", json={"tenant": tenant}
                    ).raise_for_status()
                if prefix == "pro" and len(keys) < 10:
                    created = admin.post(f"/v1/admin/consumers/{consumer}/keys", json={"tenant": tenant})
                    created.raise_for_status()
                    keys.append(created.json()["api_key"])
                consumers.append(consumer)
    Population.tenant, Population.consumers, Population.keys = tenant, consumers, keys
    log.info("seeded tenant %s: %d consumers, %d API keys", tenant, len(consumers), len(keys))


@events.quitting.add_listener
def _gate(environment: Environment, **_: object) -> None:
    """Exit non-zero when P95 exceeds the budget, nothing ran, or anything failed."""
    total = environment.stats.total
    budget = environment.parsed_options.p95_budget_ms
    p95 = total.get_response_time_percentile(0.95) or 0.0
    problems = []
    if total.num_requests == 0:
        problems.append("no request was made")
    if total.num_failures:
        problems.append(f"{total.num_failures} of {total.num_requests} requests failed")
    if p95 > budget:
        problems.append(f"P95 {p95:.1f} ms is over the budget of {budget:g} ms")
    if problems:
        log.error("latency gate FAILED: %s", "; ".join(problems))
        environment.process_exit_code = 1
    else:
        log.info(
            "latency gate passed: P95 %.1f ms within %g ms over %d requests", p95, budget, total.num_requests
        )


def _body() -> dict[str, object]:
    return {
        "tenant": Population.tenant,
        "product": "payments",
        "operation": "POST /payments",
        **Population.pick(),
    }


class AuthorizeHttpUser(HttpUser):
    """A gateway asking over HTTP, back to back."""

    wait_time = constant(0)

    @task
    def authorize(self) -> None:
        with self.client.post(
            "/v1/authorize", json=_body(), name="POST /v1/authorize", catch_response=True
        ) as r:
            if r.status_code in ANSWERS:
                r.success()
            else:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")


class AuthorizeGrpcUser(User):
    """A gateway asking over gRPC (what the Kong plugin does); each call is reported
    to Locust as a request of type "grpc"."""

    wait_time = constant(0)

    def on_start(self) -> None:
        self.channel = grpc.insecure_channel(self.environment.parsed_options.grpc_target)
        self.stub = pb_grpc.SidecarStub(self.channel)

    def on_stop(self) -> None:
        self.channel.close()

    @task
    def authorize(self) -> None:
        started = time.perf_counter()
        exception = None
        length = 0
        try:
            decision = self.stub.Authorize(pb.AuthorizeRequest(**_body()), timeout=5)
            length = decision.ByteSize()
        except grpc.RpcError as exc:
            exception = exc
        self.environment.events.request.fire(
            request_type="grpc",
            name="Authorize",
            response_time=(time.perf_counter() - started) * 1000,
            response_length=length,
            exception=exception,
            context={},
        )
