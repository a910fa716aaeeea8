"""The pipelined Redis connection of the decision path: every reply reaches its own
caller, in order, whether commands went out at once, in chunks, or were held while
others were in flight; deadlines and a lost connection answer every caller once."""

from __future__ import annotations

import asyncio
import time

import pytest

from sidecar.store.base import StoreUnavailable
from sidecar.store.resp import PIPELINE_CHUNK, PipelinedConnection, RedisReplyError, encode_command
from sidecar.store.target import parse_redis_target


async def _connected(url: str) -> PipelinedConnection:
    target = parse_redis_target(url)
    connection = PipelinedConnection(target, target.hosts[0], connect_timeout_s=1.0)
    assert await connection.execute(encode_command(["PING"])) == b"PONG"
    return connection


def _busy(connection: PipelinedConnection, key: str, seconds: str) -> asyncio.Future[object]:
    """A BLPOP on an empty list: keeps the connection busy for ``seconds``, so what is
    queued meanwhile is held client-side until its (nil) reply is in."""
    return asyncio.ensure_future(connection.execute(encode_command(["BLPOP", key, seconds])))


def _echo(connection: PipelinedConnection, text: str, deadline: float = 0.0) -> asyncio.Future[object]:
    """ECHO through the hot-path ``send`` (the reply names its caller)."""
    future: asyncio.Future[object] = asyncio.get_running_loop().create_future()

    def on_reply(reply: object) -> None:
        if isinstance(reply, BaseException):
            future.set_exception(reply)
        else:
            future.set_result(reply)

    assert connection.send(encode_command(["ECHO", text]), on_reply, deadline)
    return future


async def test_more_than_a_chunk_in_one_turn_each_gets_its_own_reply(redis_url):
    connection = await _connected(redis_url)
    try:
        count = PIPELINE_CHUNK * 5 + 3
        futures = [_echo(connection, f"m-{i}") for i in range(count)]
        async with asyncio.timeout(5):  # the tail behind the chunks must go out too
            assert await asyncio.gather(*futures) == [f"m-{i}".encode() for i in range(count)]
    finally:
        connection.close()


async def test_commands_queued_while_others_are_in_flight_are_held_then_answered_in_order(redis_url, prefix):
    connection = await _connected(redis_url)
    try:
        blocking = _busy(connection, f"{prefix}empty", "0.3")
        await asyncio.sleep(0.05)
        started = time.monotonic()
        later = []
        for turn in range(5):  # one loop turn apart each
            later += [_echo(connection, f"t{turn}-{i}") for i in range(3)]
            await asyncio.sleep(0)
        async with asyncio.timeout(5):  # a held command never sent would hang here
            replies = await asyncio.gather(*later)
        assert await blocking is None  # BLPOP timed out: nil
        assert replies == [f"t{turn}-{i}".encode() for turn in range(5) for i in range(3)]
        assert time.monotonic() - started >= 0.2  # they did wait for the BLPOP
    finally:
        connection.close()


async def test_a_held_command_past_its_deadline_times_out_and_the_order_holds(redis_url, prefix):
    connection = await _connected(redis_url)
    try:
        blocking = _busy(connection, f"{prefix}empty", "0.3")
        await asyncio.sleep(0.05)
        late = _echo(connection, "late", deadline=time.monotonic() + 0.05)
        patient = _echo(connection, "patient")
        with pytest.raises(TimeoutError):
            await late
        async with asyncio.timeout(5):
            assert await patient == b"patient"  # not "late": that reply was dropped
        assert await blocking is None
        assert await _echo(connection, "after") == b"after"
    finally:
        connection.close()


async def test_an_error_reply_fails_only_its_own_caller(redis_url):
    connection = await _connected(redis_url)
    try:
        before = _echo(connection, "before")
        bad = asyncio.ensure_future(connection.execute(encode_command(["EVALSHA", "0" * 40, "0"])))
        after = _echo(connection, "after")
        async with asyncio.timeout(5):
            assert await before == b"before"
            with pytest.raises(RedisReplyError, match="NOSCRIPT"):
                await bad
            assert await after == b"after"
    finally:
        connection.close()


async def test_a_lost_connection_fails_in_flight_and_held_commands_once(private_redis):
    connection = await _connected(private_redis.url)
    try:
        blocking = _busy(connection, "empty", "5")
        await asyncio.sleep(0.05)
        calls: list[list[object]] = [[] for _ in range(4)]
        for received in calls:
            assert connection.send(encode_command(["PING"]), received.append)
        await asyncio.sleep(0.01)  # past the end of the turn: held behind the BLPOP
        private_redis.kill()
        async with asyncio.timeout(5):
            with pytest.raises(StoreUnavailable):
                await blocking
        await asyncio.sleep(0.05)
        assert [len(received) for received in calls] == [1, 1, 1, 1]
        assert all(isinstance(received[0], StoreUnavailable) for received in calls)
        # The connection is gone: the hot path says so instead of queueing.
        assert not connection.send(encode_command(["PING"]), lambda reply: None)
    finally:
        connection.close()


async def test_a_failing_reply_callback_neither_drops_the_connection_nor_the_replies_after_it(
    redis_url, caplog
):
    connection = await _connected(redis_url)
    try:

        def broken(reply: object) -> None:
            raise ValueError("a bug in a callback")

        assert connection.send(encode_command(["ECHO", "first"]), broken)
        after = [_echo(connection, f"after-{i}") for i in range(3)]
        async with asyncio.timeout(5):
            assert await asyncio.gather(*after) == [b"after-0", b"after-1", b"after-2"]
        assert await connection.execute(encode_command(["PING"])) == b"PONG"
        assert "a reply callback failed" in caplog.text
    finally:
        connection.close()
