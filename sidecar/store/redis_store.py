"""The Redis store: one EVALSHA per decision, all of a consumer's keys in one slot.

The same code runs on one Redis, a Redis Cluster and a Sentinel-watched primary
(topology.py opens what each needs). Every script and every multi-key command touches
the keys of one hash tag, so one cluster slot (the list is in the README, "Redis
key layout"; tests/test_cluster_slots.py checks it on a real cluster); what spans
consumers (the plan's member set, the dirty set, scans) is one key or one command per
master.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from importlib import resources

import msgspec
import redis.exceptions as redis_errors
from redis.asyncio import Redis, RedisCluster

from sidecar.background import gather_bounded
from sidecar.core.access import ApiToken
from sidecar.core.api_keys import SCOPE_SEPARATOR
from sidecar.core.errors import Conflict, InvalidInput, NotFound
from sidecar.core.models import (
    ConsumerKey,
    ConsumerSpec,
    ConsumerStatus,
    ConsumerView,
    Outcome,
    Plan,
    UsageEvent,
    UsageRecord,
    WalletMode,
)
from sidecar.core.money import MAX_MICROS
from sidecar.core.wallet_rules import AutoTopup, Notice, event_time, shown_status
from sidecar.core.windows import WINDOWS, periods
from sidecar.store.base import DecisionCall, StoreDown, StoreUnavailable, TopUpResult
from sidecar.store.keys import KeySpace
from sidecar.store.resp import RedisReplyError, encode_bulks, encode_command, ignore_reply
from sidecar.store.routing import Router
from sidecar.store.slots import key_slot
from sidecar.store.target import RedisTarget, parse_redis_target
from sidecar.store.topology import Backend, Timeouts, open_backend

# Errors that mean "Redis did not answer" or "cannot serve this now" (a cluster slot
# without a master, a failover under way): the caller's fail mode applies. Any other
# error reply (a script error, CROSSSLOT) is a bug and is left to surface as a 500.
UNREACHABLE = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    # ClusterError: also a slot still migrating after redis-py's redirections ("TTL
    # exhausted"); ClusterDownError is one.
    redis_errors.ClusterError,
    redis_errors.TryAgainError,
    redis_errors.ReadOnlyError,
    redis_errors.SlotNotCoveredError,
    redis_errors.RedisClusterUnreachableError,
    OSError,
    asyncio.TimeoutError,
)
_plan_decoder = msgspec.json.Decoder(Plan)
# Consumers whose decide-command parts are kept encoded (cleared whole when full).
_PARTS_CACHE = 50_000
# How long an admin change waits for every process to acknowledge its invalidation.
INVALIDATION_WAIT_S = 0.25
log = logging.getLogger("aforo.store")
_event_encoder = msgspec.json.Encoder()
_event_decoder = msgspec.json.Decoder(UsageEvent)
_LIMIT_FIELDS = tuple(f"l_{w.value}" for w in WINDOWS)
_PIPELINE_BATCH = 1_000  # commands per pipeline when reading many keys at once
_POOL_SHARE = 32  # pooled connections one listing may hold at once
# bind.lua ARGV 12-17 that leave a consumer's own fields as they are.
_KEEP_CONSUMER = ("", "", "", "", "", "")


@contextlib.contextmanager
def _guard() -> Iterator[None]:
    """Turn "Redis did not answer" into StoreUnavailable, whatever the call."""
    try:
        yield
    except UNREACHABLE as exc:
        raise StoreUnavailable(f"redis unreachable: {exc!r}") from exc


class Script:
    """A Lua script of store/lua/, run by its SHA1 (EVALSHA) and loaded on NOSCRIPT."""

    def __init__(self, name: str, *includes: str) -> None:
        """``includes``: scripts of shared functions prepended (Redis has no import)."""
        self.name = name
        lua = resources.files("sidecar.store").joinpath("lua")
        self.source = "".join(lua.joinpath(n).read_text(encoding="utf-8") for n in (*includes, name))
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()
        self.load = encode_command(["SCRIPT", "LOAD", self.source])


def _products_field(products: list[str]) -> str:
    return f"|{'|'.join(products)}|" if products else ""


def _plan_args(plan: Plan, version: int) -> list[str | int]:
    return [
        plan.id,
        version,
        plan.price,
        _products_field(plan.products),
        *("" if limit is None else limit for limit in plan.limits()),
    ]


def _usage_record(f: dict[bytes, bytes]) -> UsageRecord:
    return UsageRecord(
        request_id=f[b"rid"].decode(),
        decision_id=f[b"did"].decode(),
        ts_ms=int(f[b"ts"]),
        tenant=f[b"t"].decode(),
        consumer_id=f[b"c"].decode(),
        product=f[b"p"].decode(),
        operation=f[b"op"].decode(),
        cost=int(f[b"cost"]),
        hits=int(f[b"hits"]),
        crossings=f.get(b"x", b"").decode(),
    )


_token_encoder = msgspec.json.Encoder()
_token_decoder = msgspec.json.Decoder(ApiToken)


def _token(record: bytes, used: bytes | None) -> ApiToken:
    token = _token_decoder.decode(record)
    return token if used is None else msgspec.structs.replace(token, last_used_ms=int(used))


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _notice(entry_id: str, f: dict[bytes, bytes]) -> Notice:
    def number(name: bytes) -> int | None:
        return int(f[name]) if name in f else None

    return Notice(
        id=entry_id,
        type=f[b"type"].decode(),
        at_ms=int(f[b"at"]),
        balance=int(f[b"balance"]),
        threshold=number(b"threshold"),
        amount=number(b"amount"),
        currency=f[b"currency"].decode() if b"currency" in f else None,
    )


def _dirty_member(member: str) -> tuple[str, str, str]:
    kind, tenant, consumer_id = member.split(":", 2)  # tenants have no ':'
    return kind, tenant, consumer_id


def next_stream_id(entry_id: str) -> str:
    """The smallest stream id above ``entry_id`` (XTRIM MINID keeps ids >= it)."""
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq) + 1}"


class _DecideReply:
    """The OnReply of one decide command: resolves ``future`` to an Outcome. NOSCRIPT
    (Redis restarted, a new cluster master, SCRIPT FLUSH) means the command did not
    run: the script is loaded and the command sent again, once, in order, to the same
    node."""

    __slots__ = ("command", "deadline", "dirty", "future", "retried", "slot", "store")

    def __init__(
        self,
        store: RedisStore,
        future: asyncio.Future[Outcome],
        command: bytes,
        slot: int,
        deadline: float,
        dirty: str,
    ) -> None:
        self.store = store
        self.future = future
        self.command = command
        self.slot = slot
        self.deadline = deadline
        self.dirty = dirty
        self.retried = False

    def __call__(self, reply: object) -> None:
        future = self.future
        if future.done():  # cancelled by its caller
            return
        if isinstance(reply, BaseException):
            if isinstance(reply, RedisReplyError) and str(reply).startswith("NOSCRIPT") and not self.retried:
                self.retried = True
                router = self.store._router
                router.send(self.slot, self.store._decide.load, ignore_reply)
                router.send(self.slot, self.command, self, self.deadline)
                return
            future.set_exception(reply)
            return
        try:
            future.set_result(self.store._outcome(reply, self.dirty))  # type: ignore[arg-type]
        except Exception as exc:  # StoreUnavailable; anything else is a bug, answered as one
            future.set_exception(exc)


def key_field(key: ConsumerKey) -> str:
    """A key's value in its consumer's hash, as key.lua stores and decide.lua reads it:
    the registration time alone, or with the expiry and the scopes when it has either."""
    created = str(key.created_ms or 1)  # '1': not known
    if key.expires_ms is None and not key.scopes:
        return created
    scopes = SCOPE_SEPARATOR.join(("", *key.scopes, "")) if key.scopes else ""
    return f"{created};{'' if key.expires_ms is None else key.expires_ms};{scopes}"


def parse_key_field(key_hash: str, value: str) -> ConsumerKey:
    created, _, rest = value.partition(";")
    expires, _, scopes = rest.partition(";")
    return ConsumerKey(
        key_hash,
        None if created == "1" else int(created),
        int(expires) if expires else None,
        tuple(s for s in scopes.split(SCOPE_SEPARATOR) if s),
    )


class RedisStore:
    """Hot store on Redis: one Redis, a Redis Cluster or a Sentinel-watched primary."""

    def __init__(
        self,
        target: RedisTarget | str,
        *,
        prefix: str = "aforo:",
        connect_timeout_s: float = 0.25,
        socket_timeout_s: float = 1.0,
        max_connections: int = 256,
        breaker_cooldown_s: float = 0.0,
        topup_reference_ttl_ms: int = 30 * 86_400_000,
    ) -> None:
        self.target = parse_redis_target(target) if isinstance(target, str) else target
        self._timeouts = Timeouts(connect_timeout_s, socket_timeout_s, breaker_cooldown_s, max_connections)
        self._backend: Backend | None = None
        self._opening: asyncio.Lock | None = None
        self._open_retry_at = 0.0  # after a failed open (auto detection), not before
        self._parts: dict[tuple[str, str, int], tuple[bytes, bytes, bytes, int]] = {}
        self._middles: dict[tuple[str, str, int | None, int, int, str | None], bytes] = {}
        # Streams this process appended to since the last flush_dirty ("u|g:t:c"): the
        # reconciler drains those first instead of scanning the whole keyspace.
        self._dirty: set[str] = set()
        self.keys = KeySpace(prefix)
        self._topup_ttl_ms = topup_reference_ttl_ms
        self._decide = Script("decide.lua", "wallet_rules.lua", "alerts.lua")
        self._bind = Script("bind.lua")
        self._status = Script("status.lua")
        self._topup = Script("topup.lua", "wallet_rules.lua")
        self._key = Script("key.lua")
        self._event = Script("event.lua", "wallet_rules.lua", "alerts.lua")
        self._plan = Script("plan.lua")
        self._settle = Script("settle.lua", "wallet_rules.lua")
        self._plan_delete = Script("plan_delete.lua")
        self._consumer_delete = Script("consumer_delete.lua")
        self.scripts = (
            self._decide,
            self._bind,
            self._status,
            self._topup,
            self._key,
            self._event,
            self._plan,
            self._settle,
            self._plan_delete,
            self._consumer_delete,
        )

    async def open(self) -> Backend:
        """What the store talks to, opened on first use. A plain redis:// URL is asked
        whether it is a cluster node here (StoreUnavailable while it cannot be reached:
        the next call asks again, at most once per breaker cooldown)."""
        backend = self._backend
        if backend is not None:
            return backend
        if time.monotonic() < self._open_retry_at:
            raise StoreDown(f"redis {self.target.describe()} is down (breaker open)")
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._backend is None:
                try:
                    self._backend = await open_backend(self.target, self._timeouts)
                except StoreUnavailable:
                    self._open_retry_at = time.monotonic() + self._timeouts.cooldown_s
                    raise
        return self._backend

    @property
    def _router(self) -> Router:
        assert self._backend is not None, "the store is not open"
        return self._backend.router

    async def _client(self) -> Redis | RedisCluster:
        return (await self.open()).client

    @property
    def client(self) -> Redis | RedisCluster:
        """The redis-py client (the store must have been opened: ``open``)."""
        assert self._backend is not None, "the store is not open"
        return self._backend.client

    @property
    def topology(self) -> str:
        """standalone, cluster or sentinel once open; the setting before."""
        return self.target.topology if self._backend is None else self._backend.target.topology

    async def _run(self, script: Script, keys: Sequence[str], args: Sequence[object]) -> object:
        """Run a script through redis-py (admin and reconciler paths)."""
        client = await self._client()
        with _guard():
            try:
                return await client.evalsha(script.sha, len(keys), *keys, *args)  # type: ignore[arg-type]
            except redis_errors.NoScriptError:
                await client.script_load(script.source)
                return await client.evalsha(script.sha, len(keys), *keys, *args)  # type: ignore[arg-type]

    async def _evalsha(self, script: Script, command: bytes, slot: int, deadline: float = 0.0) -> list:
        """Run an encoded EVALSHA of ``script`` over the pipelined connections, giving
        up at ``deadline`` (time.monotonic(); TimeoutError). NOSCRIPT means the command
        did not run: load the script on that node and run it again."""
        router = (await self.open()).router
        try:
            return await router.execute(slot, command, deadline)  # type: ignore[return-value]
        except RedisReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            await router.execute(slot, script.load, deadline)
            return await router.execute(slot, command, deadline)  # type: ignore[return-value]

    async def load_scripts(self) -> None:
        """Load every script on every master, so the first decisions need no NOSCRIPT
        round trip."""
        router = (await self.open()).router
        deadline = time.monotonic() + self._timeouts.socket_s
        for node in await router.masters():
            for script in self.scripts:
                await node.execute(script.load, deadline)

    def _decide_parts(self, call: DecisionCall) -> tuple[bytes, bytes, bytes, int]:
        """The parts of a decide command fixed for a consumer within a minute: the head
        (EVALSHA, keys 1-8) and ARGV 1-7, the whole prefix up to ARGV 7 for a decision
        without a request id (its idempotency key is never read, so one name serves),
        and the cluster slot of the consumer's hash tag. Cached: building them is most
        of the cost of encoding a decision."""
        ident = (call.tenant, call.consumer_id, call.window_starts_ms[0])
        parts = self._parts.get(ident)
        if parts is None:
            if len(self._parts) >= _PARTS_CACHE:
                self._parts.clear()
            tag = self.keys.tag(call.tenant, call.consumer_id)
            head = b"*29\r\n" + encode_bulks(
                [
                    "EVALSHA",
                    self._decide.sha,
                    9,
                    f"{tag}:c",
                    f"{tag}:u",
                    f"{tag}:n",
                    *self.keys.counters(call.tenant, call.consumer_id, call.window_starts_ms),
                ]
            )
            fixed = encode_bulks([*call.resets_ms, call.tenant, call.consumer_id])
            anonymous = head + encode_bulks([f"{tag}:r:"]) + fixed
            parts = self._parts[ident] = (head, fixed, anonymous, key_slot(tag))
        return parts

    def _decide_command(self, call: DecisionCall) -> tuple[bytes, int]:
        head, fixed, anonymous, slot = self._decide_parts(call)
        # ARGV 11-16 repeat across decisions (one product, operation and price per
        # route): encoded once.
        what = (call.product, call.operation, call.cost, call.hits, call.idempotency_ttl_ms, call.key_hash)
        middle = self._middles.get(what)
        if middle is None:
            if len(self._middles) >= _PARTS_CACHE:
                self._middles.clear()
            middle = self._middles[what] = encode_bulks(
                [
                    call.product,
                    call.operation,
                    "" if call.cost is None else call.cost,
                    call.hits,
                    call.idempotency_ttl_ms,
                    call.key_hash or "",
                ]
            )
        tail = (
            encode_bulks([call.now_ms, call.request_id, call.decision_id])
            + middle
            + encode_bulks([call.apply_by_ms])
        )
        if not call.idempotency_ttl_ms:
            return anonymous + tail, slot
        request_key = f"{self.keys.tag(call.tenant, call.consumer_id)}:r:{call.request_id}"
        return head + encode_bulks([request_key]) + fixed + tail, slot

    def decide(self, call: DecisionCall) -> asyncio.Future[Outcome]:
        """Queue the decision for the node of its consumer's slot; the future resolves
        to its Outcome (StoreUnavailable, TimeoutError past ``call.deadline``). Once the
        store is open this is one queued command and a callback: no coroutine, no task
        (a node not yet connected is connected in the background)."""
        command, slot = self._decide_command(call)
        dirty = f"u:{call.tenant}:{call.consumer_id}"
        backend = self._backend
        if backend is None:
            return asyncio.ensure_future(self._decide_opening(command, slot, call.deadline, dirty))
        router = backend.router
        reply = _DecideReply(self, router.loop().create_future(), command, slot, call.deadline, dirty)
        router.send(slot, command, reply, call.deadline)
        return reply.future

    async def _decide_opening(self, command: bytes, slot: int, deadline: float, dirty: str) -> Outcome:
        timeout = None if not deadline else max(0.0, deadline - time.monotonic())
        async with asyncio.timeout(timeout):
            await self.open()
        return self._outcome(await self._evalsha(self._decide, command, slot, deadline), dirty)

    def _outcome(self, reply: list, dirty: str) -> Outcome:
        if reply[1] == b"ok" and reply[0] == 0:
            self._dirty.add(dirty)
            if reply[16]:  # wallet notices appended: "n:" + "tenant:consumer"
                self._dirty.add("n" + dirty[1:])
        elif reply[1] == b"expired":
            raise StoreUnavailable("the decision reached Redis after its deadline; nothing was applied")
        return Outcome(
            reason=reply[1].decode(),
            charged=reply[2],
            balance=reply[3],
            decision_id=reply[4].decode(),
            retry_at_ms=reply[5],
            used=tuple([None if v < 0 else v for v in reply[6:11]]),
            limits=tuple([None if v < 0 else v for v in reply[11:16]]),
            replayed=reply[0] == 1,
        )

    async def resolve_key(self, tenant: str, key_hash: str) -> str | None:
        # The index key has no hash tag: its own slot, wherever that lives.
        client = await self._client()
        with _guard():
            found = await client.get(self.keys.api_key(tenant, key_hash))
        return None if found is None else found.decode()

    async def put_plan(self, plan: Plan) -> bool:
        return await self.apply_plan(plan, None) == 1

    async def apply_plan(self, plan: Plan, version: int | None) -> int:
        """Store ``plan`` at ``version`` (None: the next one) and re-apply it to every
        consumer bound to it. Returns the version stored, 0 if a newer one was there."""
        stored = await self._run(
            self._plan,
            [self.keys.plan(plan.tenant, plan.id)],
            ["" if version is None else version, msgspec.json.encode(plan)],
        )
        if stored == 0:
            return 0
        client = await self._client()
        with _guard():
            await client.zadd(self.keys.plans_index(plan.tenant), {plan.id: 0})
            members = await client.smembers(self.keys.plan_members(plan.tenant, plan.id))
        if members:
            # Each member is a consumer of its own slot: one bind.lua per member, all of
            # them pipelined per node over the hot path's connections.
            args = ["plan", 0, *_plan_args(plan, stored), *_KEEP_CONSUMER]
            deadline = time.monotonic() + self._timeouts.socket_s + 0.01 * len(members)
            commands = []
            for member in members:
                consumer_key = self.keys.consumer(plan.tenant, member.decode())
                command = encode_command(["EVALSHA", self._bind.sha, 1, consumer_key, *args])
                commands.append(self._evalsha(self._bind, command, key_slot(consumer_key), deadline))
            with _guard():
                await asyncio.gather(*commands)
        return int(stored)  # type: ignore[call-overload]

    async def _read_plan(self, tenant: str, plan_id: str) -> tuple[Plan, int] | None:
        spec, version = await self.client.hmget(self.keys.plan(tenant, plan_id), "spec", "version")
        if spec is None:
            return None
        return _plan_decoder.decode(spec), int(version)

    async def get_plan(self, tenant: str, plan_id: str) -> Plan | None:
        await self.open()
        with _guard():
            found = await self._read_plan(tenant, plan_id)
        return None if found is None else found[0]

    async def put_consumer(self, consumer: ConsumerSpec, now_ms: int) -> tuple[ConsumerView, bool]:
        client = await self._client()
        with _guard():
            # Join the plan's member set before reading the plan: a plan edit that lands
            # after our read then finds us and re-applies (bind.lua orders versions).
            members = self.keys.plan_members(consumer.tenant, consumer.plan_id)
            joined = await client.sadd(members, consumer.id)
            found = await self._read_plan(consumer.tenant, consumer.plan_id)
            if found is None:
                if joined:
                    await client.srem(members, consumer.id)
                raise NotFound(f"plan {consumer.plan_id!r} does not exist", code="plan_not_found")
        created = await self.apply_consumer(consumer, *found, now_ms)
        view = await self.get_consumer(consumer.tenant, consumer.id, now_ms)
        assert view is not None  # just written
        return view, created

    async def apply_consumer(
        self, consumer: ConsumerSpec, plan: Plan, plan_version: int, now_ms: int
    ) -> bool:
        """Bind ``consumer`` to ``plan`` at ``plan_version`` (status and wallet mode left
        None keep theirs). Returns whether the consumer was created."""
        t, c = consumer.tenant, consumer.id
        consumer_key = self.keys.consumer(t, c)
        status = "" if consumer.status is None else consumer.status.value
        wallet = "" if consumer.wallet_mode is None else consumer.wallet_mode.value
        saz = "" if consumer.suspend_at_zero is None else "1" if consumer.suspend_at_zero else "0"
        topup = consumer.auto_topup
        auto: list[str | int] = (
            ["", "", ""]
            if topup is None
            else [topup.threshold, topup.amount, topup.currency]
            if topup.enabled
            else ["-", "", ""]
        )
        client = await self._client()
        with _guard():
            previous = await client.hget(consumer_key, "plan")
            await client.sadd(self.keys.plan_members(t, plan.id), c)
            await client.zadd(self.keys.consumers_index(t), {c: 0})
        created, _ = await self._run(  # type: ignore[misc]
            self._bind,
            [consumer_key],
            ["upsert", now_ms, *_plan_args(plan, plan_version), status, wallet, saz, *auto],
        )
        if previous is not None and previous.decode() != plan.id:
            with _guard():
                await client.srem(self.keys.plan_members(t, previous.decode()), c)
        return created == 1

    async def _view(self, tenant: str, consumer_id: str, now_ms: int) -> ConsumerView | None:
        fields = await self.client.hgetall(self.keys.consumer(tenant, consumer_id))
        if not fields:
            return None
        starts = periods(now_ms).starts
        counters = self.keys.counters(tenant, consumer_id, starts)
        limited = [i for i, name in enumerate(_LIMIT_FIELDS) if name.encode() in fields]
        counts = await self.client.mget([counters[i] for i in limited]) if limited else []
        pending = int(fields[b"spent"]) - int(fields[b"settled"])
        base = int(fields[b"base"])
        hold = fields.get(b"hold")
        status, reason = shown_status(fields[b"status"].decode(), hold is not None)
        threshold = fields.get(b"at_thr")
        return ConsumerView(
            tenant=tenant,
            id=consumer_id,
            plan_id=fields[b"plan"].decode(),
            status=ConsumerStatus(status),
            wallet_mode=WalletMode(fields[b"wallet"].decode()),
            balance=base - pending,
            pending=pending,
            version=int(fields[b"version"]),
            windows={WINDOWS[i].value: int(count or 0) for i, count in zip(limited, counts, strict=True)},
            status_reason=reason,
            suspended_at=None if hold is None else int(hold),
            resumed_at=int(fields[b"resumed"]) if b"resumed" in fields else None,
            suspend_at_zero=fields.get(b"saz") != b"0",
            auto_topup=None
            if threshold is None
            else AutoTopup(
                threshold=int(threshold), amount=int(fields[b"at_amt"]), currency=fields[b"at_cur"].decode()
            ),
        )

    async def get_consumer(self, tenant: str, consumer_id: str, now_ms: int) -> ConsumerView | None:
        await self.open()
        with _guard():
            return await self._view(tenant, consumer_id, now_ms)

    async def set_status(
        self, tenant: str, consumer_id: str, status: ConsumerStatus, now_ms: int
    ) -> ConsumerView:
        done = await self._run(self._status, [self.keys.consumer(tenant, consumer_id)], [status.value])
        with _guard():
            view = await self._view(tenant, consumer_id, now_ms) if done else None
        if view is None:
            raise NotFound(f"consumer {consumer_id!r} does not exist", code="consumer_not_found")
        return view

    async def top_up(
        self, tenant: str, consumer_id: str, amount: int, reference: str | None, version: int | None = None
    ) -> TopUpResult:
        """Credit the wallet. ``version``: the wallet's Postgres version after this credit
        (skipped when Redis already holds that version or a newer one)."""
        keys = [
            self.keys.consumer(tenant, consumer_id),
            self.keys.topup(tenant, consumer_id, reference or ""),
            self.keys.notices(tenant, consumer_id),
        ]
        args = [amount, self._topup_ttl_ms, "1" if reference else "0", MAX_MICROS, version or "", _now_ms()]
        code, balance = await self._run(self._topup, keys, args)  # type: ignore[misc]
        if code == 1:
            self._dirty.add(f"n:{tenant}:{consumer_id}")  # a 'resumed' notice, maybe
        if code == -1:
            raise NotFound(f"consumer {consumer_id!r} does not exist", code="consumer_not_found")
        if code == -2:
            raise InvalidInput(
                f"the balance would exceed {MAX_MICROS} micros", code="invalid_amount", field="amount"
            )
        return TopUpResult(balance=balance, applied=code == 1)

    async def add_key(self, tenant: str, consumer_id: str, key: ConsumerKey) -> None:
        key_hash = key.key_hash
        index = self.keys.api_key(tenant, key_hash)
        client = await self._client()
        with _guard():
            previous = await client.set(index, consumer_id, nx=True, get=True)
            if previous is not None and previous.decode() != consumer_id:
                # Another consumer's, unless that entry is stale (its consumer no longer
                # holds the key): the consumer hash is the authority, as for decisions.
                if await client.hexists(self.keys.consumer(tenant, previous.decode()), f"k:{key_hash}"):
                    raise Conflict("this key is registered to another consumer", code="key_in_use")
                await client.set(index, consumer_id)
        done = await self._run(
            self._key, [self.keys.consumer(tenant, consumer_id)], ["add", key_hash, key_field(key)]
        )
        if done == -1:
            with _guard():
                await client.delete(index)
        if done == -1:
            raise NotFound(f"consumer {consumer_id!r} does not exist", code="consumer_not_found")

    async def revoke_key(self, tenant: str, consumer_id: str, key_hash: str) -> bool:
        index = self.keys.api_key(tenant, key_hash)
        removed = await self._run(self._key, [self.keys.consumer(tenant, consumer_id)], ["del", key_hash])
        client = await self._client()
        with _guard():
            owner = await client.get(index)
            if owner is not None and owner.decode() == consumer_id:
                await client.delete(index)
        return removed == 1

    async def list_plans(self, tenant: str, after: str | None, limit: int) -> tuple[list[Plan], str | None]:
        client = await self._client()
        with _guard():
            ids = await client.zrangebylex(
                self.keys.plans_index(tenant), f"({after}" if after else "-", "+", 0, limit + 1
            )
            found = await gather_bounded(
                (self._read_plan(tenant, i.decode()) for i in ids[:limit]), _POOL_SHARE
            )
        plans = [plan for plan, _ in filter(None, found)]
        return plans, (ids[limit - 1].decode() if len(ids) > limit else None)

    async def list_consumers(
        self,
        tenant: str,
        after: str | None,
        limit: int,
        now_ms: int,
        plan_id: str | None = None,
        status: ConsumerStatus | None = None,
    ) -> tuple[list[ConsumerView], str | None]:
        """Pages of the tenant's index, each consumer read from its own slot, filtered
        here (a filter may read several index pages to fill one)."""
        client = await self._client()
        index = self.keys.consumers_index(tenant)
        views: list[ConsumerView] = []
        cursor = after
        while True:
            with _guard():
                ids = await client.zrangebylex(index, f"({cursor}" if cursor else "-", "+", 0, limit)
                found = await gather_bounded(
                    (self._view(tenant, i.decode(), now_ms) for i in ids), _POOL_SHARE
                )
            for consumer_id, view in zip(ids, found, strict=True):
                cursor = consumer_id.decode()
                if (
                    view is None
                    or (plan_id and view.plan_id != plan_id)
                    or (status and view.status is not status)
                ):
                    continue
                views.append(view)
                if len(views) == limit:
                    return views, cursor
            if len(ids) < limit:
                return views, None

    async def consumer_keys(self, tenant: str, consumer_id: str) -> list[ConsumerKey] | None:
        client = await self._client()
        with _guard():
            fields = await client.hgetall(self.keys.consumer(tenant, consumer_id))
        if not fields:
            return None
        return sorted(
            parse_key_field(name.decode()[2:], value.decode())
            for name, value in fields.items()
            if name.startswith(b"k:")
        )

    async def delete_plan(self, tenant: str, plan_id: str, force: bool = False) -> bool:
        keys = [
            self.keys.plan(tenant, plan_id),
            self.keys.plan_members(tenant, plan_id),
            self.keys.plans_index(tenant),
        ]
        code, members = await self._run(self._plan_delete, keys, [plan_id, "1" if force else "0"])  # type: ignore[misc]
        if code == -1:
            raise Conflict(
                f"plan {plan_id!r} has {members} consumers bound to it; move or delete them first",
                code="plan_in_use",
            )
        return code == 1

    async def delete_consumer(self, tenant: str, consumer_id: str, now_ms: int) -> bool:
        consumer_key = self.keys.consumer(tenant, consumer_id)
        counters = self.keys.counters(tenant, consumer_id, periods(now_ms).starts)
        removed = await self._run(self._consumer_delete, [consumer_key, *counters], [])
        client = await self._client()
        with _guard():
            await client.zrem(self.keys.consumers_index(tenant), consumer_id)
            if not removed:
                return False
            plan, *key_hashes = (v.decode() for v in removed)  # type: ignore[union-attr]
            await client.srem(self.keys.plan_members(tenant, plan), consumer_id)
            for key_hash in key_hashes:
                index = self.keys.api_key(tenant, key_hash)
                owner = await client.get(index)
                if owner is not None and owner.decode() == consumer_id:
                    await client.delete(index)
        return True

    async def usage(self, tenant: str, consumer_id: str) -> list[UsageRecord]:
        client = await self._client()
        with _guard():
            entries = await client.xrange(self.keys.usage(tenant, consumer_id))
        return [_usage_record(fields) for _, fields in entries]

    async def record_events(
        self, events: Sequence[UsageEvent], dedupe_ttl_ms: int, rate: bool = True
    ) -> list[bool]:
        # Over the pipelined connection: a batch goes out in one write, each event its
        # own atomic script (events of different consumers live in different slots).
        now = _now_ms()
        commands = [self._event_command(e, dedupe_ttl_ms, now, rate) for e in events]
        replies = await asyncio.gather(*(self._evalsha(self._event, c, slot) for c, slot in commands))
        for event, (stored, rated, notices) in zip(events, replies, strict=True):
            if stored:
                self._dirty.add(f"g:{event.tenant}:{event.consumer_id}")
            if rated:
                self._dirty.add(f"u:{event.tenant}:{event.consumer_id}")
            if notices:
                self._dirty.add(f"n:{event.tenant}:{event.consumer_id}")
        return [stored == 1 for stored, _, _ in replies]

    def _event_command(self, e: UsageEvent, dedupe_ttl_ms: int, now_ms: int, rate: bool) -> tuple[bytes, int]:
        """event.lua for one event: the window counters are those of the periods that
        hold the event's own time."""
        ks, t, c = self.keys, e.tenant, e.consumer_id
        at = event_time(e.started_at_ms, now_ms)
        bounds = periods(at)
        command = encode_command(
            [
                "EVALSHA",
                self._event.sha,
                11,
                ks.event_marker(t, c, e.request_id),
                ks.events(t, c),
                ks.consumer(t, c),
                ks.usage(t, c),
                ks.notices(t, c),
                ks.request(t, c, e.request_id),
                *ks.counters(t, c, bounds.starts),
                dedupe_ttl_ms,
                _event_encoder.encode(e),
                e.request_id,
                at,
                t,
                c,
                e.product,
                e.route,
                e.count,
                e.decision_id,
                *bounds.resets,
                now_ms,
                "1" if rate else "0",
            ]
        )
        return command, key_slot(ks.tag(t, c))

    async def notices(self, tenant: str, consumer_id: str) -> list[Notice] | None:
        client = await self._client()
        with _guard():
            if not await client.exists(self.keys.consumer(tenant, consumer_id)):
                return None
        return await self.read_notices(tenant, consumer_id, None)

    async def events(self, tenant: str, consumer_id: str) -> list[UsageEvent]:
        client = await self._client()
        with _guard():
            entries = await client.xrange(self.keys.events(tenant, consumer_id))
        return [_event_decoder.decode(fields[b"e"]) for _, fields in entries]

    # --- used by the reconciler (Postgres is the truth) -------------------------------

    async def apply_keys(self, tenant: str, consumer_id: str, active: dict[str, ConsumerKey]) -> None:
        """Make the consumer's registered keys exactly ``active`` (by hash), with their
        expiry and scopes."""
        present = {k.key_hash: k for k in await self.consumer_keys(tenant, consumer_id) or ()}
        for key_hash, key in active.items():
            here = present.get(key_hash)
            if here is None or (here.expires_ms, here.scopes) != (key.expires_ms, key.scopes):
                await self.add_key(tenant, consumer_id, key)
        for key_hash in present.keys() - active.keys():
            await self.revoke_key(tenant, consumer_id, key_hash)

    async def settle(
        self,
        tenant: str,
        consumer_id: str,
        balance: int,
        settled: int,
        version: int,
        trim_before: str | None = None,
    ) -> bool:
        """Take the Postgres wallet (see settle.lua) and trim the usage stream below
        ``trim_before``. Returns whether the wallet was applied (False: Redis had it)."""
        applied, _ = await self._run(  # type: ignore[misc]
            self._settle,
            [
                self.keys.consumer(tenant, consumer_id),
                self.keys.usage(tenant, consumer_id),
                self.keys.notices(tenant, consumer_id),
            ],
            [balance, settled, version, trim_before or "", _now_ms()],
        )
        return applied == 1

    async def beat(self) -> None:
        """The reconciler's heartbeat: when it last drained (kept a minute)."""
        client = await self._client()
        with _guard():
            await client.set(self.keys.heartbeat(), _now_ms(), px=60_000)

    async def health(self) -> tuple[int | None, int]:
        """(the reconciler's last heartbeat in ms, or None; streams waiting to be drained)."""
        client = await self._client()
        with _guard():
            beat = await client.get(self.keys.heartbeat())
            waiting = await client.scard(self.keys.dirty())
        return (None if beat is None else int(beat)), waiting

    async def flush_dirty(self) -> int:
        """Publish the streams appended to since the last flush to the shared dirty set
        (one SADD, off the decision path). Kept for the next flush if Redis is away."""
        if not self._dirty:
            return 0
        members, self._dirty = self._dirty, set()
        try:
            client = await self._client()
            with _guard():
                await client.sadd(self.keys.dirty(), *members)
        except StoreUnavailable:
            self._dirty |= members
            raise
        return len(members)

    async def take_dirty(self, count: int) -> list[tuple[str, str, str]]:
        """Pop up to ``count`` dirty streams: (kind, tenant, consumer)."""
        client = await self._client()
        with _guard():
            popped = await client.spop(self.keys.dirty(), count)
        return [_dirty_member(m.decode()) for m in popped or []]

    async def return_dirty(self, streams: list[tuple[str, str, str]]) -> None:
        """Put back streams that were popped but not drained (the drain failed)."""
        if streams:
            client = await self._client()
            with _guard():
                await client.sadd(self.keys.dirty(), *(":".join(s) for s in streams))

    async def _scan(self, pattern: str, kind: str) -> list[str]:
        """Every key matching ``pattern`` of Redis type ``kind``, prefix removed: on a
        cluster, redis-py's SCAN walks every master in turn."""
        client = await self._client()
        start = len(self.keys.prefix)
        with _guard():
            return [k.decode()[start:] async for k in client.scan_iter(match=pattern, count=1000, _type=kind)]

    async def _scan_consumers(self, suffix: str, kind: str) -> list[tuple[str, str]]:
        """(tenant, consumer) of every ``{tenant:consumer}:<suffix>`` key of type ``kind``."""
        found = set()
        for name in await self._scan(f"{self.keys.prefix}{{*}}:{suffix}", kind):
            tenant, _, consumer_id = name.split("}", 1)[0][1:].partition(":")  # tenants have no ':'
            found.add((tenant, consumer_id))
        return sorted(found)

    async def scan_streams(self, kind: str) -> list[tuple[str, str]]:
        """(tenant, consumer) of every stream of ``kind`` ("u": usage, "g": events)."""
        return await self._scan_consumers(kind, "stream")

    async def scan_consumers(self) -> list[tuple[str, str]]:
        """(tenant, consumer) of every consumer the hot store holds (full sync)."""
        return await self._scan_consumers("c", "hash")

    async def scan_plans(self) -> list[tuple[str, str]]:
        """(tenant, plan) of every plan the hot store holds (full sync)."""
        found = []
        for name in await self._scan(f"{self.keys.prefix}plan:{{*}}:*", "hash"):
            tenant, _, plan_id = name[len("plan:{") :].partition("}:")
            found.append((tenant, plan_id))
        return sorted(found)

    async def scan_key_index(self) -> list[tuple[str, str, str]]:
        """(tenant, key hash, owner) of every API key index entry (full sync)."""
        names = await self._scan(f"{self.keys.prefix}key:*", "string")
        entries = []
        with _guard():
            owners = await self._pipelined("GET", [self.keys.prefix + n for n in names])
        for name, owner in zip(names, owners, strict=True):
            tenant, _, key_hash = name[len("key:") :].partition(":")
            if owner is not None:
                entries.append((tenant, key_hash, owner.decode()))
        return entries

    async def drop_key_index(self, tenant: str, key_hash: str, owner: str) -> None:
        """Remove an index entry still naming ``owner`` (a key the truth no longer has)."""
        index = self.keys.api_key(tenant, key_hash)
        client = await self._client()
        with _guard():
            current = await client.get(index)
            if current is not None and current.decode() == owner:
                await client.delete(index)

    async def prune(self, tenant: str) -> int:
        """Drop the tenant's index entries and plan member set entries that no longer
        match what Redis itself holds: an id without its plan or consumer hash, a member
        whose consumer is bound to another plan (or gone). Checked against Redis, not a
        Postgres snapshot, so nothing written meanwhile is dropped. Returns the count."""
        client = await self._client()
        removed = 0
        with _guard():
            plan_ids = [m.decode() for m in await client.zrange(self.keys.plans_index(tenant), 0, -1)]
            plan_found = await self._pipelined("EXISTS", [self.keys.plan(tenant, p) for p in plan_ids])
            gone = [p for p, n in zip(plan_ids, plan_found, strict=True) if not n]
            if gone:
                removed += await client.zrem(self.keys.plans_index(tenant), *gone)
            index = self.keys.consumers_index(tenant)
            consumer_ids = [m.decode() for m in await client.zrange(index, 0, -1)]
            plan_of = await self._plans_of(tenant, consumer_ids)
            gone = [c for c in consumer_ids if c not in plan_of]
            if gone:
                removed += await client.zrem(index, *gone)
            for plan_id in plan_ids:
                key = self.keys.plan_members(tenant, plan_id)
                members = [m.decode() for m in await client.smembers(key)]
                # Members missing from the index: ask their consumer hash itself.
                plan_of.update(await self._plans_of(tenant, [m for m in members if m not in plan_of]))
                stale = [m for m in members if plan_of.get(m) != plan_id]
                if stale:
                    removed += await client.srem(key, *stale)
        return removed

    async def _plans_of(self, tenant: str, consumer_ids: list[str]) -> dict[str, str]:
        """The plan each of these consumers is bound to in Redis (absent: no consumer)."""
        plans = await self._pipelined("HGET", [self.keys.consumer(tenant, c) for c in consumer_ids], "plan")
        return {c: p.decode() for c, p in zip(consumer_ids, plans, strict=True) if p is not None}

    async def _pipelined(self, command: str, keys: list[str], *args: str) -> list[object]:
        """``command key *args`` for each key, in pipelines of _PIPELINE_BATCH: a tenant
        of any size costs a few round trips and never more pool connections than one
        (a gather of single commands would take a connection each, past the pool's cap)."""
        client = await self._client()
        replies: list[object] = []
        for start in range(0, len(keys), _PIPELINE_BATCH):
            pipe = client.pipeline(transaction=False)
            for key in keys[start : start + _PIPELINE_BATCH]:
                pipe.execute_command(command, key, *args)
            replies += await pipe.execute()
        return replies

    async def read_usage(self, tenant: str, consumer_id: str, count: int) -> list[tuple[str, UsageRecord]]:
        """The oldest ``count`` usage records with their stream ids."""
        client = await self._client()
        with _guard():
            entries = await client.xrange(self.keys.usage(tenant, consumer_id), count=count)
        return [(entry_id.decode(), _usage_record(fields)) for entry_id, fields in entries]

    async def read_events(self, tenant: str, consumer_id: str, count: int) -> list[tuple[str, UsageEvent]]:
        client = await self._client()
        with _guard():
            entries = await client.xrange(self.keys.events(tenant, consumer_id), count=count)
        return [(entry_id.decode(), _event_decoder.decode(fields[b"e"])) for entry_id, fields in entries]

    async def read_notices(self, tenant: str, consumer_id: str, count: int | None) -> list[Notice]:
        client = await self._client()
        with _guard():
            entries = await client.xrange(self.keys.notices(tenant, consumer_id), count=count)
        return [_notice(entry_id.decode(), fields) for entry_id, fields in entries]

    async def trim_notices(self, tenant: str, consumer_id: str, before: str) -> None:
        client = await self._client()
        with _guard():
            await client.xtrim(self.keys.notices(tenant, consumer_id), minid=before, approximate=False)

    async def trim_usage(self, tenant: str, consumer_id: str, before: str) -> None:
        """Trim a usage stream without touching a wallet (its consumer has none in Postgres)."""
        client = await self._client()
        with _guard():
            await client.xtrim(self.keys.usage(tenant, consumer_id), minid=before, approximate=False)

    async def trim_events(self, tenant: str, consumer_id: str, before: str) -> None:
        client = await self._client()
        with _guard():
            await client.xtrim(self.keys.events(tenant, consumer_id), minid=before, approximate=False)

    async def window_counts(self, tenant: str, consumer_id: str, starts_ms: tuple[int, ...]) -> list[int]:
        """The current count of every window period (WINDOWS order; 0 when absent)."""
        client = await self._client()
        with _guard():
            values = await client.mget(self.keys.counters(tenant, consumer_id, starts_ms))
        return [int(v or 0) for v in values]

    async def publish_invalidation(self, tenant: str, consumer_id: str, *, wait: bool = False) -> None:
        """Tell every sidecar process to drop what it cached of this consumer (``*``:
        of every consumer of the tenant). Plain PUBLISH: a cluster forwards it to every
        node, so a subscriber on any node hears it.

        With ``wait`` (an admin change), return once every process that heard it has
        dropped it (each acknowledges on a counter), or after INVALIDATION_WAIT_S: the
        caller's next decision, in any process, sees the change. PUBLISH counts the
        listeners subscribed through the node it reached: all of them on one Redis or a
        Sentinel primary, those of that node on a cluster (the wait is partial there)."""
        client = await self._client()
        message_id = uuid.uuid4().hex
        with _guard():
            heard = await client.publish(self.keys.invalidations(), f"{message_id} {tenant}:{consumer_id}")
        if not wait or not heard:
            return
        key = self.keys.invalidation_ack(message_id)
        deadline = time.monotonic() + INVALIDATION_WAIT_S
        while time.monotonic() < deadline:
            with _guard():
                if int(await client.get(key) or 0) >= heard:
                    return
            await asyncio.sleep(0.001)
        log.warning("invalidation of %s:%s: not every listener acknowledged it in time", tenant, consumer_id)

    async def acknowledge_invalidation(self, message_id: str) -> None:
        """A listener has dropped what an invalidation named (see publish_invalidation)."""
        client = await self._client()
        key = self.keys.invalidation_ack(message_id)
        with _guard():
            await client.incr(key)
            await client.pexpire(key, 60_000)

    async def put_token(self, token: ApiToken) -> None:
        client = await self._client()
        record = _token_encoder.encode(msgspec.structs.replace(token, last_used_ms=None))
        with _guard():
            # The record first: a listing skips an indexed id without one, never the reverse.
            await client.hset(self.keys.token(token.id), "r", record)  # type: ignore[misc]
            await client.sadd(self.keys.tokens_index(token.tenant), token.id)  # type: ignore[misc]

    async def get_token(self, token_id: str) -> ApiToken | None:
        client = await self._client()
        with _guard():
            record, used = await client.hmget(self.keys.token(token_id), ["r", "u"])  # type: ignore[misc]
        return None if record is None else _token(record, used)

    async def list_tokens(self, tenant: str) -> list[ApiToken]:
        client = await self._client()
        with _guard():
            ids = sorted(m.decode() for m in await client.smembers(self.keys.tokens_index(tenant)))  # type: ignore[misc]
            rows = await self._pipelined("HMGET", [self.keys.token(i) for i in ids], "r", "u")
        tokens = [_token(record, used) for record, used in rows if record is not None]  # type: ignore[misc]
        return sorted(tokens, key=lambda t: (t.created_ms, t.id))

    async def touch_token(self, token_id: str, used_ms: int) -> None:
        client = await self._client()
        with _guard():
            await client.hset(self.keys.token(token_id), "u", used_ms)  # type: ignore[misc]

    async def ping(self) -> None:
        """Ready: one Redis or the primary answers PING; on a cluster every slot has a
        master (read from the cluster now) and every master answers."""
        await (await self.open()).router.check()

    async def close(self) -> None:
        backend, self._backend = self._backend, None
        if backend is not None:
            backend.router.close()
            await backend.client.aclose()
