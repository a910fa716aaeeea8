"""Handler threads kept between events, for kong-pdk's threading mode.

kong-pdk runs every phase of every request (``PluginServer.handle_event``) on a thread
started for it, and holds its server-wide event lock until that thread's first PDK call
or return. Measured on the 2-core box (Python 3.11): starting a thread plus the two
queue hand-offs costs about 200 µs, the hand-offs to a thread already running about
45 µs, and an access phase has at least two such hand-offs (the event and the consumer
lookup). ``PooledPluginServer`` keeps the protocol and the handler API of kong-pdk
(a handler makes blocking PDK calls through ``kong``) and changes only how the handler
gets a thread: an idle one is reused, a new one is started when none is idle (so
concurrency is unbounded, as with kong-pdk), and a thread idle for ``IDLE_S`` ends. The
event lock is held only while the event id is taken, not while the handler runs.

Installed by ``kong_plugin.server`` (kong-pdk's ``start_dedicated_server`` builds the
``PluginServer`` its module names).
"""

from __future__ import annotations

import functools
import itertools
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from kong_pdk.exception import PluginServerException
from kong_pdk.pdk import Kong
from kong_pdk.server import MSG_RET, PluginServer

log = logging.getLogger("aforo.kong.server")
IDLE_S = 60.0

# A job returns what to call once its thread is idle again (or None): the last word of
# an event is said only when its thread can take the next event.
Job = tuple[Callable[..., Callable[[], None] | None], tuple[Any, ...]]


class HandlerThreads:
    """Threads that run jobs one at a time and wait, idle, for the next."""

    def __init__(self, idle_s: float = IDLE_S) -> None:
        self.idle_s = idle_s
        self._idle: list[queue.SimpleQueue[Job]] = []  # inboxes of idle threads, last idle first
        self._lock = threading.Lock()
        self.started = 0  # threads started, for tests and the benchmark

    def run(self, fn: Callable[..., Callable[[], None] | None], *args: Any) -> None:
        with self._lock:
            inbox = self._idle.pop() if self._idle else None
            if inbox is None:
                self.started += 1
        if inbox is None:
            inbox = queue.SimpleQueue()
            threading.Thread(target=self._work, args=(inbox,), name="aforo-kong-handler", daemon=True).start()
        inbox.put((fn, args))

    def _work(self, inbox: queue.SimpleQueue[Job]) -> None:
        while True:
            try:
                fn, args = inbox.get(timeout=self.idle_s)
            except queue.Empty:
                with self._lock:
                    if inbox in self._idle:
                        self._idle.remove(inbox)
                        return
                # Taken off the idle list just as the wait ended: its job is coming.
                continue
            then = None
            try:
                then = fn(*args)
            except Exception:
                log.exception("a handler thread's job failed")
            with self._lock:
                self._idle.append(inbox)
            if then is not None:
                then()


class _Channel:
    """One side of an event's two queues: what kong-pdk's PDK bridge and its step
    calls use (``put`` and ``get``)."""

    __slots__ = ("get", "put")

    def __init__(self, put: Callable[[Any], None], get: Callable[[], Any]) -> None:
        self.put = put
        self.get = get


def _run_phase(phase: Callable[[Any], None], channel: _Channel, lua_style: bool) -> Callable[[], None]:
    try:
        phase(Kong(channel, lua_style).kong)
    except Exception:
        # The event still ends (below) instead of leaving Kong waiting: kong-pdk's own
        # thread would just die.
        log.exception("a plugin handler failed")
    # After a terminal PDK call nobody reads it, which is harmless: the queues belong
    # to this event only.
    return functools.partial(channel.put, MSG_RET)


class PooledPluginServer(PluginServer):  # type: ignore[misc]
    """kong-pdk's PluginServer (threading mode) with handler threads kept between events."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.use_multiprocess or self.use_gevent:
            raise ValueError("PooledPluginServer runs in kong-pdk's threading mode only")
        self.threads = HandlerThreads()
        self._event_ids = itertools.count()

    def handle_event(self, event: dict[str, Any]) -> dict[str, Any]:
        iid = event["InstanceId"]
        instance = self.instances.get(iid)
        if instance is None:
            # Kong expects the error to start with "no plugin instance" (it then starts
            # the instance again).
            raise PluginServerException(f"no plugin instance #{iid}")
        instance.reset_expire_ts()
        eid = next(self._event_ids)  # atomic in CPython: no lock needed
        to_handler: queue.SimpleQueue[Any] = queue.SimpleQueue()
        from_handler: queue.SimpleQueue[Any] = queue.SimpleQueue()
        server_side = _Channel(to_handler.put, from_handler.get)
        self.threads.run(
            _run_phase,
            getattr(instance.cls, event["EventName"]),
            _Channel(from_handler.put, to_handler.get),
            self.lua_style,
        )
        first = server_side.get()
        if first != MSG_RET:
            self.events[eid] = server_side
        return {"Data": first, "EventId": eid}
