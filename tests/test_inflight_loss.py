"""The ambiguous case: a connection lost while a decision is in flight. Redis may have
run it, the sidecar cannot know: it answers from the fail mode and never sends it again,
so a decision is counted at most once; a gateway retry with the same request id gets
the first decision back (replayed) instead of a second count.

A TCP proxy in front of a real Redis swallows the reply to one command and closes the
connection: the command ran, its answer never arrived."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from sidecar.authorizer import Authorizer
from sidecar.core.clock import now_ms
from sidecar.core.models import AuthorizeRequest, ConsumerSpec, Plan
from sidecar.store.redis_store import RedisStore
from tests.conftest import make_settings


class ReplyEater:
    """Forwards bytes both ways; once armed, drops the next reply and hangs up."""

    def __init__(self, redis_port: int) -> None:
        self.redis_port = redis_port
        self.armed = False
        self.eaten = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.redis_port)

        async def requests() -> None:
            while data := await reader.read(65536):
                up_writer.write(data)
            up_writer.close()

        async def replies() -> None:
            while data := await up_reader.read(65536):
                if self.armed:
                    self.armed = False
                    self.eaten += 1
                    writer.transport.abort()  # the reply is gone with the connection
                    up_writer.close()
                    return
                writer.write(data)
            writer.close()

        with contextlib.suppress(OSError, ConnectionError):
            await asyncio.gather(requests(), replies())

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


@contextlib.asynccontextmanager
async def _through_proxy(private_redis, prefix: str) -> AsyncIterator[tuple[ReplyEater, RedisStore]]:  # type: ignore[no-untyped-def]
    proxy = ReplyEater(private_redis.port)
    port = await proxy.start()
    store = RedisStore(f"redis://127.0.0.1:{port}/0", prefix=prefix)
    try:
        await store.load_scripts()
        await store.put_plan(Plan(id="p", windows={"day": 100}, price=10).validated())
        await store.put_consumer(ConsumerSpec(id="c1", plan_id="p").validated(), now_ms())
        await store.top_up("default", "c1", 1_000, None)
        yield proxy, store
    finally:
        await store.close()
        await proxy.close()


async def test_a_decision_whose_reply_is_lost_is_counted_at_most_once(private_redis, prefix):
    async with _through_proxy(private_redis, prefix) as (proxy, store):
        authorizer = Authorizer(store, make_settings(redis_url=private_redis.url, fail_mode="closed"))

        def request(request_id: str | None = None) -> AuthorizeRequest:
            return AuthorizeRequest(consumer_id="c1", product="api", request_id=request_id).validated()

        assert (await authorizer.authorize(request("r-1"))).reason == "ok"
        # Its reply lost: the fail mode answers (closed: 503), Redis did count it.
        proxy.armed = True
        lost = await authorizer.authorize(request("r-2"))
        assert proxy.eaten == 1
        assert (lost.status, lost.reason, lost.degraded) == (503, "store_unavailable", True)
        # The gateway retries with the same request id: the first decision, not a second.
        retried = await authorizer.authorize(request("r-2"))
        assert (retried.reason, retried.replayed) == ("ok", True)
        # Without a request id nothing can be replayed; still, nothing is re-sent.
        proxy.armed = True
        anonymous = await authorizer.authorize(request())
        assert (anonymous.reason, anonymous.degraded, proxy.eaten) == ("store_unavailable", True, 2)
        assert (await authorizer.authorize(request())).reason == "ok"

        view = await store.get_consumer("default", "c1", now_ms())
        assert view is not None
        assert (view.windows, view.balance) == ({"day": 4}, 1_000 - 4 * 10)
        usage = await store.usage("default", "c1")
        assert [r.request_id for r in usage][:2] == ["r-1", "r-2"]
        assert len(usage) == 4 and len({r.decision_id for r in usage}) == 4
        assert retried.decision_id == usage[1].decision_id
