"""Sidecar processes on a real Redis Cluster: the admin API and decisions on 3 masters,
exact quotas and wallets under 64 clients and 2 processes, live resharding under that
load, and a master SIGKILLed under load (its replica promoted)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter, defaultdict
from typing import Any

import asyncpg
import httpx
import pytest

from sidecar.store.slots import key_slot
from tests.conftest import ADMIN, until
from tests.decision_load import Answer, hammer, poll_readiness, steady_jobs
from tests.outage import check_applied_once, check_outage
from tests.redis_servers import RedisClusterServers

pytestmark = pytest.mark.slow
AUTHORIZE = "/v1/authorize"
# Slots moved back and forth by the resharding test: few enough that several moves
# complete within its load even on a slow day, holding 6 of its consumers.
MOVED_SLOTS = 64


def spread(
    cluster: RedisClusterServers, prefix: str, per_master: int, name: str = "c", slots: range | None = None
) -> dict[int, list[str]]:
    """Consumer ids, ``per_master`` on every master (by its slot table), optionally only
    ids whose slot lies in ``slots``: {master port: [ids]}."""
    owners = cluster.slot_owners()
    found: dict[int, list[str]] = defaultdict(list)
    ports = {m.port for m in cluster.masters()}
    if slots is not None:
        ports = {owners[s] for s in slots}
    i = 0
    while any(len(found[p]) < per_master for p in ports):
        consumer_id = f"{name}{i}"
        i += 1
        slot = key_slot(f"{prefix}{{default:{consumer_id}}}:c")
        if slots is not None and slot not in slots:
            continue
        if owners[slot] in ports and len(found[owners[slot]]) < per_master:
            found[owners[slot]].append(consumer_id)
    return dict(found)


def _env(url: str, prefix: str, **extra: str) -> dict[str, str]:
    return {"AFORO_REDIS_URL": url, "AFORO_KEY_PREFIX": prefix, **extra}


def _put(http: httpx.Client, path: str, body: dict[str, Any]) -> None:
    response = http.put(path, json=body, headers=ADMIN)
    assert response.status_code in (200, 201), response.text


def _post(http: httpx.Client, path: str, body: dict[str, Any], status: int = 200) -> httpx.Response:
    response = http.post(path, json=body, headers=ADMIN)
    assert response.status_code == status, response.text
    return response


def test_a_sidecar_on_a_three_master_cluster_runs_every_endpoint(
    redis_cluster, prefix, start_sidecar, migrated_database
):
    """Acceptance 1, through a plain redis:// URL to one node (the cluster is detected)."""
    node = redis_cluster.servers[0]
    sidecar = start_sidecar(
        _env(f"redis://127.0.0.1:{node.port}/0", prefix, AFORO_DATABASE_URL=migrated_database)
    )
    by_master = spread(redis_cluster, prefix, per_master=10)
    consumers = [c for ids in by_master.values() for c in ids]
    assert len(consumers) == 30 and len(by_master) == 3
    with httpx.Client(base_url=sidecar.url, timeout=10) as http:
        _put(http, "/v1/admin/plans/roomy", {"windows": {"day": 1000}, "price": 10})
        _put(http, "/v1/admin/plans/tight", {"windows": {"minute": 3}})
        for consumer_id in consumers:
            _put(http, f"/v1/admin/consumers/{consumer_id}", {"plan_id": "roomy", "wallet_mode": "postpaid"})
        _put(http, "/v1/admin/consumers/tight-one", {"plan_id": "tight"})

        jobs = [(AUTHORIZE, {"consumer_id": c, "product": "api"}) for c in consumers for _ in range(3)]
        answers = asyncio.run(hammer([sidecar.decision_port], jobs, clients=8))
        assert Counter((a.status, a.body["reason"]) for a in answers) == {(200, "ok"): 90}
        body = {"consumer_id": "tight-one", "product": "api"}
        tight = asyncio.run(hammer([sidecar.decision_port], [(AUTHORIZE, body)] * 4, clients=1))
        expected = [(200, "ok")] * 3 + [(429, "quota_exceeded")]
        assert [(a.status, a.body["reason"]) for a in tight] == expected

        # Every admin endpoint, on consumers of every master.
        one, two, three = (ids[0] for ids in by_master.values())
        assert http.get("/v1/admin/plans/roomy", headers=ADMIN).json()["windows"] == {"day": 1000}
        assert http.get(f"/v1/admin/consumers/{one}", headers=ADMIN).json()["windows"] == {"day": 3}
        assert (
            _post(http, f"/v1/admin/consumers/{one}/topup", {"amount": 1_000_000}).json()["balance"]
            == 1_000_000 - 30
        )
        key = _post(http, f"/v1/admin/consumers/{two}/keys", {}, status=201).json()
        keyed = http.post(AUTHORIZE, json={"api_key": key["api_key"], "product": "api"})
        assert (keyed.status_code, keyed.json()["consumer_id"]) == (200, two)
        assert (
            http.delete(f"/v1/admin/consumers/{two}/keys/{key['key_hash']}", headers=ADMIN).status_code == 200
        )
        revoked_key = http.post(AUTHORIZE, json={"api_key": key["api_key"], "product": "api"})
        assert revoked_key.json()["reason"] == "invalid_key"
        _post(http, f"/v1/admin/consumers/{three}/suspend", {})
        assert (
            http.post(AUTHORIZE, json={"consumer_id": three, "product": "api"}).json()["reason"]
            == "suspended"
        )
        _post(http, f"/v1/admin/consumers/{three}/resume", {})
        assert http.post(AUTHORIZE, json={"consumer_id": three, "product": "api"}).json()["reason"] == "ok"
        _post(http, "/integrations/kong/suspend", {"consumer_id": one})
        assert (
            http.post(AUTHORIZE, json={"consumer_id": one, "product": "api"}).json()["reason"] == "suspended"
        )
        _post(http, "/integrations/kong/resume", {"consumer_id": one})
        _post(http, "/integrations/apigee/suspend", {"appId": two, "mode": "suspend"})
        assert (
            http.post(AUTHORIZE, json={"consumer_id": two, "product": "api"}).json()["reason"] == "suspended"
        )
        _post(http, "/integrations/apigee/resume", {"appId": two})
        _post(http, f"/v1/admin/consumers/{three}/revoke", {})
        assert (
            http.post(AUTHORIZE, json={"consumer_id": three, "product": "api"}).json()["reason"] == "revoked"
        )
        assert http.get("/v1/admin/reconciliation", headers=ADMIN).status_code == 200
        # A plan edit reaches its consumers on every master.
        _put(http, "/v1/admin/plans/roomy", {"windows": {"day": 3}, "price": 10})
        after = [
            http.post(AUTHORIZE, json={"consumer_id": ids[-1], "product": "api"})
            for ids in by_master.values()
        ]
        assert [r.json()["reason"] for r in after] == ["quota_exceeded"] * 3
        assert http.get("/readyz").status_code == 200

    # The keys landed on all 3 masters, each consumer's keys on its own master.
    for port, ids in by_master.items():
        client = redis_cluster.server_on(port).client()
        found = {k.decode() for k in client.scan_iter(match=f"{prefix}*", count=1000)}
        assert {f"{prefix}{{default:{c}}}:c" for c in ids} <= found


def _load_jobs(free: list[str], paid: list[str], per_consumer: int) -> list[tuple[str, dict[str, Any]]]:
    """``per_consumer`` requests for every consumer, interleaved."""
    jobs = []
    for i in range(per_consumer):
        jobs += [(AUTHORIZE, {"consumer_id": c, "product": "api", "request_id": f"{c}-{i}"}) for c in free]
        jobs += [(AUTHORIZE, {"consumer_id": c, "product": "api", "request_id": f"{c}-{i}"}) for c in paid]
    return jobs


def _seed_load(url: str, free: list[str], paid: list[str]) -> None:
    with httpx.Client(base_url=url, timeout=10) as http:
        _put(http, "/v1/admin/plans/free", {"windows": {"day": 500}})
        _put(http, "/v1/admin/plans/priced", {"price": 25_000})
        for consumer_id in free:
            _put(http, f"/v1/admin/consumers/{consumer_id}", {"plan_id": "free"})
        for consumer_id in paid:
            _put(http, f"/v1/admin/consumers/{consumer_id}", {"plan_id": "priced"})
            _post(http, f"/v1/admin/consumers/{consumer_id}/topup", {"amount": 300 * 25_000})


def _assert_exact(
    answers: list[Answer], free: list[str], paid: list[str], admin_url: str, settling: bool = False
) -> None:
    """Acceptance 2's counts: 500 allowed per free consumer, 300 per priced one, the
    rest denied for the right reason, no fail-mode answer, no 500; balances exactly 0
    (pending debits: all of them, unless a reconciler is ``settling`` them meanwhile)."""
    assert Counter(a.status for a in answers) == {200: 10 * 500 + 10 * 300, 429: 10 * 500, 402: 10 * 700}
    assert not any(a.body["degraded"] for a in answers)
    allowed = Counter(a.body["consumer_id"] for a in answers if a.body["allow"])
    assert allowed == {**{c: 500 for c in free}, **{c: 300 for c in paid}}
    with httpx.Client(base_url=admin_url, timeout=10) as http:
        for consumer_id in free:
            assert http.get(f"/v1/admin/consumers/{consumer_id}", headers=ADMIN).json()["windows"] == {
                "day": 500
            }
        for consumer_id in paid:
            view = http.get(f"/v1/admin/consumers/{consumer_id}", headers=ADMIN).json()
            assert view["balance"] == 0
            assert settling or view["pending"] == 300 * 25_000


async def test_exact_quotas_and_wallets_from_two_processes_on_every_master(
    redis_cluster, prefix, start_sidecar
):
    """Acceptance 2: 2 processes, 64 clients, 20 consumers over all masters, 1,000
    requests each."""
    env = _env(redis_cluster.url, prefix, AFORO_DECISION_TIMEOUT_MS="10000")
    sidecars = [start_sidecar(env) for _ in range(2)]
    ids = [c for group in spread(redis_cluster, prefix, per_master=7).values() for c in group][:20]
    free, paid = ids[::2], ids[1::2]
    masters = {redis_cluster.slot_owners()[key_slot(f"{prefix}{{default:{c}}}:c")] for c in free + paid}
    assert len(masters) == 3
    _seed_load(sidecars[0].url, free, paid)
    answers = await hammer([s.decision_port for s in sidecars], _load_jobs(free, paid, 1000), clients=64)
    _assert_exact(answers, free, paid, sidecars[1].url)


class Resharder(threading.Thread):
    """Moves ``count`` slots from ``source`` to ``target`` and back with
    ``redis-cli --cluster reshard`` (it takes a node's lowest slots), again and again
    until stopped: the slots holding the chosen consumers keep moving under load."""

    def __init__(self, cluster: RedisClusterServers, source, target, count: int) -> None:  # type: ignore[no-untyped-def]
        super().__init__(daemon=True)
        self.cluster, self.source, self.target, self.count = cluster, source, target, count
        self.stop = threading.Event()
        self.moves: list[tuple[float, float]] = []  # (start, end) of each completed move
        self.error: BaseException | None = None

    def run(self) -> None:
        there = False
        try:
            while not self.stop.is_set():
                started = time.monotonic()
                source, target = (self.target, self.source) if there else (self.source, self.target)
                # redis-cli refuses to start while the nodes disagree on the last move.
                self.cluster.wait_ok()
                self.cluster.reshard(self.count, source, target)
                self.moves.append((started, time.monotonic()))
                there = not there
        except BaseException as exc:
            self.error = exc


async def test_resharding_under_load_keeps_counts_exact_and_the_ledger_single(
    private_cluster, prefix, start_sidecar, migrated_database, reconciler
):
    """Acceptance 3: the load of acceptance 2 while slots holding 6 of its consumers
    move between masters, back and forth; the reconciler drains the usage into
    Postgres meanwhile."""
    cluster = private_cluster
    owners = cluster.slot_owners()
    source = cluster.server_on(owners[0])  # redis-cli moves a node's lowest slots first
    first = owners.index(source.port)
    moving = [
        c
        for ids in spread(cluster, prefix, 6, name="m", slots=range(first, first + MOVED_SLOTS)).values()
        for c in ids
    ]
    target = next(m for m in cluster.masters() if m.port != source.port)
    staying = [c for port, ids in spread(cluster, prefix, 7).items() if port != source.port for c in ids]
    ids = moving + staying
    assert len(ids) == 20
    free, paid = ids[::2], ids[1::2]
    env = _env(cluster.url, prefix, AFORO_DECISION_TIMEOUT_MS="10000", AFORO_DATABASE_URL=migrated_database)
    sidecars = [start_sidecar(env) for _ in range(2)]
    reconciler(migrated_database, cluster.url, prefix)
    _seed_load(sidecars[0].url, free, paid)

    resharder = Resharder(cluster, source, target, MOVED_SLOTS)
    load = asyncio.ensure_future(
        hammer([s.decision_port for s in sidecars], _load_jobs(free, paid, 1000), clients=64)
    )
    resharder.start()
    answers = await load
    load_end = time.monotonic()
    resharder.stop.set()
    await asyncio.to_thread(resharder.join, 120)
    assert resharder.error is None, resharder.error
    assert any(end <= load_end for _, end in resharder.moves), "no resharding completed during the load"

    _assert_exact(answers, free, paid, sidecars[1].url, settling=True)
    db = await asyncpg.connect(migrated_database)
    try:

        async def drained() -> bool:
            return await db.fetchval("SELECT count(*) FROM usage_records") == 10 * 500 + 10 * 300

        await until(drained, 60, "the reconciler to drain every usage record")
        rows = await db.fetch(
            "SELECT consumer_id, count(*) AS n, count(DISTINCT request_id) AS r FROM usage_records GROUP BY 1"
        )
        assert {r["consumer_id"]: (r["n"], r["r"]) for r in rows} == {
            **{c: (500, 500) for c in free},
            **{c: (300, 300) for c in paid},
        }
        allowed_ids = {a.body["request_id"] for a in answers if a.body["allow"]}
        ledger_ids = {r["request_id"] for r in await db.fetch("SELECT request_id FROM usage_records")}
        assert ledger_ids == allowed_ids

        async def settled() -> bool:
            wallets = await db.fetch(
                "SELECT balance, settled_debits FROM wallets WHERE consumer_id = ANY($1)", paid
            )
            return [tuple(w) for w in wallets] == [(0, 300 * 25_000)] * len(paid)

        await until(settled, 30, "every prepaid wallet settled at exactly 0 in Postgres")
    finally:
        await db.close()


async def test_a_master_killed_under_load_fails_only_its_slots_until_its_replica_takes_over(
    private_cluster, prefix, start_sidecar
):
    """Acceptance 4 and 5: SIGKILL a master (its replica present) under load. Its
    consumers get the fail mode for at most 10 s, then real decisions, without a
    restart; the other masters' consumers never fail; no 500; nothing applied twice.
    /readyz is 503 while its slots have no master and 200 after the failover."""
    cluster = private_cluster
    groups = spread(cluster, prefix, per_master=3)
    victim_port, hit = next(iter(groups.items()))
    spared = [c for port, ids in groups.items() if port != victim_port for c in ids]
    # A deadline of 500 ms: on these 2 cores, shared by 2 sidecars, 6 Redis servers and
    # the load, a decision may miss 50 ms for want of CPU, which is not what is tested
    # (the dead master's decisions fail at once: its connections are refused).
    env = _env(
        cluster.url,
        prefix,
        AFORO_FAIL_MODE="closed",
        AFORO_BREAKER_COOLDOWN_MS="300",
        AFORO_DECISION_TIMEOUT_MS="500",
    )
    sidecars = [start_sidecar(env) for _ in range(2)]
    with httpx.Client(base_url=sidecars[0].url, timeout=10) as http:
        _put(http, "/v1/admin/plans/big", {"windows": {"day": 10_000_000}})
        for consumer_id in hit + spared:
            _put(http, f"/v1/admin/consumers/{consumer_id}", {"plan_id": "big"})

    started = time.monotonic()
    end = started + 16
    load = asyncio.ensure_future(
        hammer([s.decision_port for s in sidecars], steady_jobs(hit + spared, end), clients=16)
    )
    readiness = asyncio.ensure_future(poll_readiness(sidecars[0].url, end))
    await asyncio.sleep(2)
    killed_at = time.monotonic()
    cluster.server_on(victim_port).kill()
    answers, ready = await asyncio.gather(load, readiness)

    allowed = check_outage(answers, hit, spared, killed_at)
    assert [s for t, s in ready if t < killed_at] and all(s == 200 for t, s in ready if t < killed_at)
    assert 503 in [s for t, s in ready if t > killed_at], "/readyz never saw the slots without a master"
    assert ready[-1][1] == 200, "/readyz did not come back after the failover"
    cluster.wait_ok()
    client = cluster.client()
    try:
        lost_or_ambiguous = check_applied_once(client, prefix, allowed, exact=spared)
    finally:
        client.close()
    assert sum(lost_or_ambiguous.values()) <= 16, lost_or_ambiguous  # at most one in flight per client
