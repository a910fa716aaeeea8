"""Handler threads kept between events (kong_plugin/handler_threads.py): kong-pdk's
real PluginServer protocol methods (HandleEvent, Step) driven in process, as Kong's
RPCs call them; the plugin server process itself is covered by every tests/test_kong_*
test through the emulator."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from kong_pdk.exception import PluginServerException
from kong_pdk.module import Module
from kong_pdk.server import MSG_RET

from kong_plugin.handler_threads import HandlerThreads, PooledPluginServer


class _Plugin:
    """Access reads the consumer and echoes its id back with a response header; log
    raises; every handler records the thread it ran on."""

    threads: set[int] = set()

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def access(self, kong: Any) -> None:
        _Plugin.threads.add(threading.get_ident())
        consumer = kong.client.get_consumer()
        kong.response.set_header("X-Echo", consumer["id"])

    def log(self, kong: Any) -> None:
        _Plugin.threads.add(threading.get_ident())
        raise RuntimeError("a handler bug")


@pytest.fixture
def server() -> tuple[PooledPluginServer, int]:
    class mod:  # the shape kong-pdk's start_dedicated_server registers
        Plugin = _Plugin
        Schema: list[Any] = []
        version = "0"
        priority = 0

    ps = PooledPluginServer(lua_style=False)
    ps.plugins["echo"] = Module("echo", module=mod)
    _Plugin.threads = set()
    iid = ps.start_instance({"Name": "echo", "Config": json.dumps({})})["Id"]
    return ps, iid


def _access(ps: PooledPluginServer, iid: int, consumer_id: str) -> str:
    """One access phase as Kong drives it; returns the header value the handler set."""
    first = ps.handle_event({"InstanceId": iid, "EventName": "access"})
    assert first["Data"] == {"Method": "kong.client.get_consumer", "Args": ()}
    second = ps.step({"EventId": first["EventId"], "Data": {"id": consumer_id}})
    assert second["Data"]["Method"] == "kong.response.set_header"
    name, value = second["Data"]["Args"]
    assert name == "X-Echo"
    third = ps.step({"EventId": first["EventId"], "Data": None})
    assert third["Data"] == MSG_RET
    return value


def test_events_reuse_one_thread_when_run_one_after_another(server: tuple[PooledPluginServer, int]) -> None:
    ps, iid = server
    for i in range(50):
        assert _access(ps, iid, f"c{i}") == f"c{i}"
    assert ps.threads.started == 1
    assert len(_Plugin.threads) == 1
    assert ps.events == {}  # every finished event was forgotten


def test_concurrent_events_each_get_their_own_answers(server: tuple[PooledPluginServer, int]) -> None:
    ps, iid = server
    with ThreadPoolExecutor(max_workers=32) as pool:
        echoed = list(pool.map(lambda i: _access(ps, iid, f"c{i}"), range(400)))
    assert echoed == [f"c{i}" for i in range(400)]
    assert 1 <= ps.threads.started <= 32
    assert ps.events == {}


def test_a_handler_that_raises_ends_its_event_and_its_thread_serves_the_next(
    server: tuple[PooledPluginServer, int],
) -> None:
    ps, iid = server
    answer = ps.handle_event({"InstanceId": iid, "EventName": "log"})
    assert answer["Data"] == MSG_RET  # kong-pdk's own thread would die and leave Kong waiting
    assert ps.events == {}
    assert _access(ps, iid, "after") == "after"
    assert ps.threads.started == 1


def test_an_unknown_instance_is_refused_as_kong_expects(server: tuple[PooledPluginServer, int]) -> None:
    ps, _ = server
    with pytest.raises(PluginServerException, match=r"^no plugin instance #99"):
        ps.handle_event({"InstanceId": 99, "EventName": "access"})
    assert ps.threads.started == 0


def test_idle_threads_end_and_new_ones_start_when_needed() -> None:
    threads = HandlerThreads(idle_s=0.05)
    done: list[int] = []
    finished = threading.Event()

    def job(n: int) -> None:
        done.append(n)
        if len(done) == 2:
            finished.set()

    threads.run(job, 1)
    time.sleep(0.01)  # the first job is done, its thread idle
    threads.run(job, 2)
    assert finished.wait(2)
    assert threads.started == 1  # reused while idle
    deadline = time.monotonic() + 2
    while threads._idle and time.monotonic() < deadline:  # the idle thread ends
        time.sleep(0.01)
    assert threads._idle == []
    threads.run(job, 3)
    deadline = time.monotonic() + 2
    while len(done) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert done == [1, 2, 3]
    assert threads.started == 2


def test_blocked_handlers_never_hold_up_another_event() -> None:
    threads = HandlerThreads()
    release = threading.Event()
    ran = threading.Event()

    def blocked() -> None:
        release.wait(5)

    for _ in range(8):
        threads.run(blocked)
    threads.run(ran.set)
    assert ran.wait(2)  # a ninth thread, not a queue behind the eight
    assert threads.started == 9
    release.set()
