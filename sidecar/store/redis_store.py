"""The Redis store: one EVALSHA per decision, all of a consumer's keys in one slot."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence
from importlib import resources

import msgspec
import redis.exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript

from sidecar.core.errors import InvalidInput, NotFound
from sidecar.core.models import (
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
from sidecar.core.windows import WINDOWS, periods
from sidecar.store.base import DecisionCall, StoreUnavailable, TopUpResult
from sidecar.store.keys import KeySpace
from sidecar.store.resp import PipelinedConnection, RedisReplyError, encode_bulks, encode_command

# Errors that mean "Redis did not answer": the caller's fail mode applies. A script
# error (ResponseError) is a bug and is left to surface as a 500.
UNREACHABLE = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    OSError,
    asyncio.TimeoutError,
)
_plan_decoder = msgspec.json.Decoder(Plan)
# Consumers whose decide-command parts are kept encoded (cleared whole when full).
_PARTS_CACHE = 50_000
_event_encoder = msgspec.json.Encoder()
_event_decoder = msgspec.json.Decoder(UsageEvent)
_LIMIT_FIELDS = tuple(f"l_{w.value}" for w in WINDOWS)


@contextlib.contextmanager
def _guard() -> Iterator[None]:
    """Turn "Redis did not answer" into StoreUnavailable, whatever the call."""
    try:
        yield
    except UNREACHABLE as exc:
        raise StoreUnavailable(f"redis unreachable: {exc!r}") from exc


def _load_script(name: str) -> str:
    return resources.files("sidecar.store").joinpath("lua", name).read_text(encoding="utf-8")


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
    (Redis restarted, SCRIPT FLUSH) means the command did not run: the script is
    loaded and the command sent again, once, in order on the same connection."""

    __slots__ = ("command", "deadline", "dirty", "future", "retried", "store")

    def __init__(
        self, store: RedisStore, future: asyncio.Future[Outcome], command: bytes, deadline: float, dirty: str
    ) -> None:
        self.store = store
        self.future = future
        self.command = command
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
                fast = self.store._fast
                load = encode_command(["SCRIPT", "LOAD", self.store._decide.script])
                if fast.send(load, _ignore) and fast.send(self.command, self, self.deadline):
                    return
                reply = StoreUnavailable("redis connection lost while reloading the decide script")
            future.set_exception(reply)
            return
        try:
            future.set_result(self.store._outcome(reply, self.dirty))  # type: ignore[arg-type]
        except StoreUnavailable as exc:
            future.set_exception(exc)


def _ignore(reply: object) -> None:
    """OnReply of a command whose answer nobody waits for (a SCRIPT LOAD: a failure
    shows in the reply to the command sent after it)."""


class RedisStore:
    """Hot store on Redis (standalone or behind a proxy; the key layout is cluster-safe)."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "aforo:",
        connect_timeout_s: float = 0.25,
        socket_timeout_s: float = 1.0,
        max_connections: int = 256,
        topup_reference_ttl_ms: int = 30 * 86_400_000,
    ) -> None:
        # No client-side retries: a decision that timed out may have run, and only the
        # request id (not a blind retry) may safely repeat it.
        self._redis = Redis.from_url(
            url,
            socket_connect_timeout=connect_timeout_s,
            socket_timeout=socket_timeout_s,
            retry=Retry(NoBackoff(), 0),
            max_connections=max_connections,
            health_check_interval=0,
        )
        self._fast = PipelinedConnection(url, connect_timeout_s)
        self._parts: dict[tuple[str, str, int], tuple[bytes, bytes, bytes]] = {}
        self._middles: dict[tuple[str, str, int | None, int, int, str | None], bytes] = {}
        # Streams this process appended to since the last flush_dirty ("u|g:t:c"): the
        # reconciler drains those first instead of scanning the whole keyspace.
        self._dirty: set[str] = set()
        self.keys = KeySpace(prefix)
        self._topup_ttl_ms = topup_reference_ttl_ms
        self._decide = self._redis.register_script(_load_script("decide.lua"))
        self._bind = self._redis.register_script(_load_script("bind.lua"))
        self._status = self._redis.register_script(_load_script("status.lua"))
        self._topup = self._redis.register_script(_load_script("topup.lua"))
        self._key = self._redis.register_script(_load_script("key.lua"))
        self._event = self._redis.register_script(_load_script("event.lua"))
        self._plan = self._redis.register_script(_load_script("plan.lua"))
        self._settle = self._redis.register_script(_load_script("settle.lua"))
        self._scripts = (
            self._decide,
            self._bind,
            self._status,
            self._topup,
            self._key,
            self._event,
            self._plan,
            self._settle,
        )

    async def _evalsha(self, script: AsyncScript, command: bytes, deadline: float = 0.0) -> list:
        """Run an encoded EVALSHA of ``script`` over the pipelined connection, giving
        up at ``deadline`` (time.monotonic(); TimeoutError). Connects if needed; NOSCRIPT
        (Redis restarted, SCRIPT FLUSH) means the command did not run: load the script
        and run it again."""
        try:
            return await self._fast.execute(command, deadline)  # type: ignore[return-value]
        except RedisReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            await self._fast.execute(encode_command(["SCRIPT", "LOAD", script.script]), deadline)
            return await self._fast.execute(command, deadline)  # type: ignore[return-value]

    def answering(self) -> bool:
        """Redis has answered decisions in the last 200 ms: a missed deadline now is
        this process being slow (overload), not Redis being gone."""
        return self._fast.answered_within(0.2)

    @property
    def client(self) -> Redis:
        return self._redis

    async def load_scripts(self) -> None:
        """Load every script once so the first decisions need no NOSCRIPT round trip."""
        with _guard():
            for script in self._scripts:
                await self._redis.script_load(script.script)

    def _decide_parts(self, call: DecisionCall) -> tuple[bytes, bytes, bytes]:
        """The parts of a decide command fixed for a consumer within a minute: the head
        (EVALSHA, keys 1-7) and ARGV 1-7, and the whole prefix up to ARGV 7 for a
        decision without a request id (its idempotency key is never read, so one name
        serves). Cached: building them is most of the cost of encoding a decision."""
        ident = (call.tenant, call.consumer_id, call.window_starts_ms[0])
        parts = self._parts.get(ident)
        if parts is None:
            if len(self._parts) >= _PARTS_CACHE:
                self._parts.clear()
            tag = self.keys.tag(call.tenant, call.consumer_id)
            head = b"*28\r\n" + encode_bulks(
                [
                    "EVALSHA",
                    self._decide.sha,
                    8,
                    f"{tag}:c",
                    f"{tag}:u",
                    *self.keys.counters(call.tenant, call.consumer_id, call.window_starts_ms),
                ]
            )
            fixed = encode_bulks([*call.resets_ms, call.tenant, call.consumer_id])
            parts = self._parts[ident] = (head, fixed, head + encode_bulks([f"{tag}:r:"]) + fixed)
        return parts

    def _decide_command(self, call: DecisionCall) -> bytes:
        head, fixed, anonymous = self._decide_parts(call)
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
            return anonymous + tail
        request_key = f"{self.keys.tag(call.tenant, call.consumer_id)}:r:{call.request_id}"
        return head + encode_bulks([request_key]) + fixed + tail

    def decide(self, call: DecisionCall) -> asyncio.Future[Outcome]:
        """Queue the decision on the pipelined connection; the future resolves to its
        Outcome (StoreUnavailable, TimeoutError past ``call.deadline``). Connected,
        this is one queued command and a callback: no coroutine, no task."""
        command = self._decide_command(call)
        dirty = f"u:{call.tenant}:{call.consumer_id}"
        loop = self._fast.loop
        if loop is not None:
            reply = _DecideReply(self, loop.create_future(), command, call.deadline, dirty)
            if self._fast.send(command, reply, call.deadline):
                return reply.future
        return asyncio.ensure_future(self._decide_connecting(command, call.deadline, dirty))

    async def _decide_connecting(self, command: bytes, deadline: float, dirty: str) -> Outcome:
        return self._outcome(await self._evalsha(self._decide, command, deadline), dirty)

    def _outcome(self, reply: list, dirty: str) -> Outcome:
        if reply[1] == b"ok" and reply[0] == 0:
            self._dirty.add(dirty)
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
        with _guard():
            found = await self._redis.get(self.keys.api_key(tenant, key_hash))
        return None if found is None else found.decode()

    async def put_plan(self, plan: Plan) -> bool:
        return await self.apply_plan(plan, None) == 1

    async def apply_plan(self, plan: Plan, version: int | None) -> int:
        """Store ``plan`` at ``version`` (None: the next one) and re-apply it to every
        consumer bound to it. Returns the version stored, 0 if a newer one was there."""
        with _guard():
            stored = await self._plan(
                keys=[self.keys.plan(plan.tenant, plan.id)],
                args=["" if version is None else version, msgspec.json.encode(plan)],
            )
            if stored == 0:
                return 0
            members = await self._redis.smembers(self.keys.plan_members(plan.tenant, plan.id))
            if members:
                args = ["plan", 0, *_plan_args(plan, stored), "", ""]
                async with self._redis.pipeline(transaction=False) as pipe:
                    for member in members:
                        consumer_key = self.keys.consumer(plan.tenant, member.decode())
                        await self._bind(keys=[consumer_key], args=args, client=pipe)
                    await pipe.execute()
        return stored

    async def _read_plan(self, tenant: str, plan_id: str) -> tuple[Plan, int] | None:
        spec, version = await self._redis.hmget(self.keys.plan(tenant, plan_id), "spec", "version")
        if spec is None:
            return None
        return _plan_decoder.decode(spec), int(version)

    async def get_plan(self, tenant: str, plan_id: str) -> Plan | None:
        with _guard():
            found = await self._read_plan(tenant, plan_id)
        return None if found is None else found[0]

    async def put_consumer(self, consumer: ConsumerSpec, now_ms: int) -> tuple[ConsumerView, bool]:
        with _guard():
            # Join the plan's member set before reading the plan: a plan edit that lands
            # after our read then finds us and re-applies (bind.lua orders versions).
            members = self.keys.plan_members(consumer.tenant, consumer.plan_id)
            joined = await self._redis.sadd(members, consumer.id)
            found = await self._read_plan(consumer.tenant, consumer.plan_id)
            if found is None:
                if joined:
                    await self._redis.srem(members, consumer.id)
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
        with _guard():
            previous = await self._redis.hget(consumer_key, "plan")
            await self._redis.sadd(self.keys.plan_members(t, plan.id), c)
            created, _ = await self._bind(
                keys=[consumer_key],
                args=["upsert", now_ms, *_plan_args(plan, plan_version), status, wallet],
            )
            if previous is not None and previous.decode() != plan.id:
                await self._redis.srem(self.keys.plan_members(t, previous.decode()), c)
        return created == 1

    async def _view(self, tenant: str, consumer_id: str, now_ms: int) -> ConsumerView | None:
        fields = await self._redis.hgetall(self.keys.consumer(tenant, consumer_id))
        if not fields:
            return None
        starts = periods(now_ms).starts
        counters = self.keys.counters(tenant, consumer_id, starts)
        limited = [i for i, name in enumerate(_LIMIT_FIELDS) if name.encode() in fields]
        counts = await self._redis.mget([counters[i] for i in limited]) if limited else []
        pending = int(fields[b"spent"]) - int(fields[b"settled"])
        base = int(fields[b"base"])
        return ConsumerView(
            tenant=tenant,
            id=consumer_id,
            plan_id=fields[b"plan"].decode(),
            status=ConsumerStatus(fields[b"status"].decode()),
            wallet_mode=WalletMode(fields[b"wallet"].decode()),
            balance=base - pending,
            pending=pending,
            version=int(fields[b"version"]),
            windows={WINDOWS[i].value: int(count or 0) for i, count in zip(limited, counts, strict=True)},
        )

    async def get_consumer(self, tenant: str, consumer_id: str, now_ms: int) -> ConsumerView | None:
        with _guard():
            return await self._view(tenant, consumer_id, now_ms)

    async def set_status(
        self, tenant: str, consumer_id: str, status: ConsumerStatus, now_ms: int
    ) -> ConsumerView:
        with _guard():
            done = await self._status(keys=[self.keys.consumer(tenant, consumer_id)], args=[status.value])
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
        ]
        args = [amount, self._topup_ttl_ms, "1" if reference else "0", MAX_MICROS, version or ""]
        with _guard():
            code, balance = await self._topup(keys=keys, args=args)
        if code == -1:
            raise NotFound(f"consumer {consumer_id!r} does not exist", code="consumer_not_found")
        if code == -2:
            raise InvalidInput(
                f"the balance would exceed {MAX_MICROS} micros", code="invalid_amount", field="amount"
            )
        return TopUpResult(balance=balance, applied=code == 1)

    async def add_key(self, tenant: str, consumer_id: str, key_hash: str) -> None:
        index = self.keys.api_key(tenant, key_hash)
        with _guard():
            await self._redis.set(index, consumer_id)
            done = await self._key(keys=[self.keys.consumer(tenant, consumer_id)], args=["add", key_hash])
            if done == -1:
                await self._redis.delete(index)
        if done == -1:
            raise NotFound(f"consumer {consumer_id!r} does not exist", code="consumer_not_found")

    async def revoke_key(self, tenant: str, consumer_id: str, key_hash: str) -> bool:
        index = self.keys.api_key(tenant, key_hash)
        with _guard():
            removed = await self._key(keys=[self.keys.consumer(tenant, consumer_id)], args=["del", key_hash])
            owner = await self._redis.get(index)
            if owner is not None and owner.decode() == consumer_id:
                await self._redis.delete(index)
        return removed == 1

    async def usage(self, tenant: str, consumer_id: str) -> list[UsageRecord]:
        with _guard():
            entries = await self._redis.xrange(self.keys.usage(tenant, consumer_id))
        return [_usage_record(fields) for _, fields in entries]

    async def record_events(self, events: Sequence[UsageEvent], dedupe_ttl_ms: int) -> list[bool]:
        # Over the pipelined connection: a batch goes out in one write, each event its
        # own atomic script (events of different consumers live in different slots).
        ks, sha = self.keys, self._event.sha
        commands = [
            encode_command(
                [
                    "EVALSHA",
                    sha,
                    2,
                    ks.event_marker(e.tenant, e.consumer_id, e.request_id),
                    ks.events(e.tenant, e.consumer_id),
                    dedupe_ttl_ms,
                    _event_encoder.encode(e),
                ]
            )
            for e in events
        ]
        replies = await asyncio.gather(*(self._evalsha(self._event, command) for command in commands))
        for event, reply in zip(events, replies, strict=True):
            if reply == 1:
                self._dirty.add(f"g:{event.tenant}:{event.consumer_id}")
        return [reply == 1 for reply in replies]

    async def events(self, tenant: str, consumer_id: str) -> list[UsageEvent]:
        with _guard():
            entries = await self._redis.xrange(self.keys.events(tenant, consumer_id))
        return [_event_decoder.decode(fields[b"e"]) for _, fields in entries]

    # --- used by the reconciler (Postgres is the truth) -------------------------------

    async def apply_keys(self, tenant: str, consumer_id: str, active: set[str]) -> None:
        """Make the consumer's registered key hashes exactly ``active``."""
        consumer_key = self.keys.consumer(tenant, consumer_id)
        with _guard():
            fields = await self._redis.hkeys(consumer_key)
            present = {f.decode()[2:] for f in fields if f.startswith(b"k:")}
            for key_hash in active - present:
                await self.add_key(tenant, consumer_id, key_hash)
            for key_hash in present - active:
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
        with _guard():
            applied, _ = await self._settle(
                keys=[self.keys.consumer(tenant, consumer_id), self.keys.usage(tenant, consumer_id)],
                args=[balance, settled, version, trim_before or ""],
            )
        return applied == 1

    async def flush_dirty(self) -> int:
        """Publish the streams appended to since the last flush to the shared dirty set
        (one SADD, off the decision path). Kept for the next flush if Redis is away."""
        if not self._dirty:
            return 0
        members, self._dirty = self._dirty, set()
        try:
            with _guard():
                await self._redis.sadd(self.keys.dirty(), *members)
        except StoreUnavailable:
            self._dirty |= members
            raise
        return len(members)

    async def take_dirty(self, count: int) -> list[tuple[str, str, str]]:
        """Pop up to ``count`` dirty streams: (kind, tenant, consumer)."""
        with _guard():
            popped = await self._redis.spop(self.keys.dirty(), count)
        return [_dirty_member(m.decode()) for m in popped or []]

    async def return_dirty(self, streams: list[tuple[str, str, str]]) -> None:
        """Put back streams that were popped but not drained (the drain failed)."""
        if streams:
            with _guard():
                await self._redis.sadd(self.keys.dirty(), *(":".join(s) for s in streams))

    async def scan_streams(self, kind: str) -> list[tuple[str, str]]:
        """(tenant, consumer) of every stream of ``kind`` ("u": usage, "g": events)."""
        pattern = f"{self.keys.prefix}{{*}}:{kind}"
        found = set()
        with _guard():
            async for key in self._redis.scan_iter(match=pattern, count=1000, _type="stream"):
                tag = key.decode()[len(self.keys.prefix) :].split("}", 1)[0][1:]
                tenant, _, consumer_id = tag.partition(":")
                found.add((tenant, consumer_id))
        return sorted(found)

    async def read_usage(self, tenant: str, consumer_id: str, count: int) -> list[tuple[str, UsageRecord]]:
        """The oldest ``count`` usage records with their stream ids."""
        with _guard():
            entries = await self._redis.xrange(self.keys.usage(tenant, consumer_id), count=count)
        return [(entry_id.decode(), _usage_record(fields)) for entry_id, fields in entries]

    async def read_events(self, tenant: str, consumer_id: str, count: int) -> list[tuple[str, UsageEvent]]:
        with _guard():
            entries = await self._redis.xrange(self.keys.events(tenant, consumer_id), count=count)
        return [(entry_id.decode(), _event_decoder.decode(fields[b"e"])) for entry_id, fields in entries]

    async def trim_events(self, tenant: str, consumer_id: str, before: str) -> None:
        with _guard():
            await self._redis.xtrim(self.keys.events(tenant, consumer_id), minid=before, approximate=False)

    async def window_counts(self, tenant: str, consumer_id: str, starts_ms: tuple[int, ...]) -> list[int]:
        """The current count of every window period (WINDOWS order; 0 when absent)."""
        with _guard():
            values = await self._redis.mget(self.keys.counters(tenant, consumer_id, starts_ms))
        return [int(v or 0) for v in values]

    async def publish_invalidation(self, tenant: str, consumer_id: str) -> None:
        """Tell every sidecar process to drop what it cached of this consumer."""
        with _guard():
            await self._redis.publish(self.keys.invalidations(), f"{tenant}:{consumer_id}")

    async def ping(self) -> None:
        with _guard():
            await self._redis.ping()

    async def close(self) -> None:
        self._fast.close()
        await self._redis.aclose()
