"""Usage events, off the request path: the log phase hands an event to a bounded
in-process queue and returns; a background thread sends batches to the sidecar.

The queue is bounded so a sidecar outage costs memory up to ``usage_queue_size``
events and then drops new ones, counted (``dropped``), never blocking Kong. A batch
that fails is kept and resent with backoff (the sidecar deduplicates on request id,
so a batch stored before its answer was lost is not counted twice). At shutdown the
queue is flushed for up to ``SHUTDOWN_FLUSH_S``; what is still unsent is counted as
``lost``. Every counter is in ``stats()`` and in the log line written at shutdown.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any

from kong_plugin.client import Address, SidecarClient, SidecarUnavailable

log = logging.getLogger("aforo.kong.usage")

SEND_TIMEOUT_S = 5.0
MAX_BACKOFF_S = 30.0
SHUTDOWN_FLUSH_S = 5.0
# A full queue or a failing sidecar is reported at most this often (per batcher).
LOG_EVERY_S = 10.0

Event = dict[str, Any]


class UsageBatcher:
    def __init__(
        self, client: SidecarClient, queue_size: int, batch_size: int, flush_interval_s: float
    ) -> None:
        self.client = client
        self.capacity = queue_size
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self._queue: collections.deque[Event] = collections.deque()
        self._retry: list[Event] | None = None
        self._cond = threading.Condition()
        self._closing = False
        self._last_drop_log = 0.0
        self._last_fail_log = 0.0
        self.enqueued = 0
        self.dropped = 0
        self.accepted = 0
        self.duplicates = 0
        self.rejected = 0
        self.batches = 0
        self.failures = 0
        self.lost = 0
        self._thread = threading.Thread(target=self._run, name="aforo-usage", daemon=True)
        self._thread.start()

    def offer(self, event: Event) -> bool:
        """Queue one event without blocking; False (and counted) when it is dropped."""
        with self._cond:
            if self._closing or len(self._queue) >= self.capacity:
                self.dropped += 1
                now = time.monotonic()
                if now - self._last_drop_log >= LOG_EVERY_S:
                    self._last_drop_log = now
                    log.warning(
                        "usage queue full (%d events): dropping new events, %d dropped so far",
                        self.capacity,
                        self.dropped,
                    )
                return False
            self._queue.append(event)
            self.enqueued += 1
            if len(self._queue) >= self.batch_size:
                self._cond.notify()
        return True

    def stats(self) -> dict[str, int]:
        with self._cond:
            pending = len(self._queue) + len(self._retry or ())
            return {
                "enqueued": self.enqueued,
                "accepted": self.accepted,
                "duplicates": self.duplicates,
                "rejected": self.rejected,
                "dropped": self.dropped,
                "lost": self.lost,
                "pending": pending,
                "batches": self.batches,
                "failures": self.failures,
            }

    def _next_batch(self) -> list[Event] | None:
        """Wait for a batch to send; None when closing with nothing left."""
        with self._cond:
            if self._retry is not None:
                return self._retry
            if not self._closing and len(self._queue) < self.batch_size:
                self._cond.wait(timeout=self.flush_interval_s)
            if not self._queue:
                return None if self._closing else []
            count = min(self.batch_size, len(self._queue))
            self._retry = [self._queue.popleft() for _ in range(count)]
            return self._retry

    def _run(self) -> None:
        backoff = 0.0
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if not batch:
                continue
            try:
                ack = self.client.report_usage(batch, SEND_TIMEOUT_S)
            except SidecarUnavailable as exc:
                backoff = min(MAX_BACKOFF_S, max(backoff * 2, self.flush_interval_s, 0.1))
                with self._cond:
                    self.failures += 1
                    now = time.monotonic()
                    if now - self._last_fail_log >= LOG_EVERY_S:
                        self._last_fail_log = now
                        log.warning(
                            "usage batch of %d events not sent (%s); retrying in %.1fs, %d pending",
                            len(batch),
                            exc,
                            backoff,
                            len(self._queue) + len(batch),
                        )
                    # Closing: retry promptly until the shutdown deadline instead.
                    self._cond.wait(timeout=0.1 if self._closing else backoff)
                continue
            except Exception:
                # A bug must not kill the sender thread; the batch is retried like an outage.
                log.exception("usage batch failed unexpectedly; retrying")
                backoff = min(MAX_BACKOFF_S, max(backoff * 2, self.flush_interval_s, 0.1))
                with self._cond:
                    self.failures += 1
                    self._cond.wait(timeout=0.1 if self._closing else backoff)
                continue
            backoff = 0.0
            with self._cond:
                self._retry = None
                self.batches += 1
                self.accepted += ack.accepted
                self.duplicates += ack.duplicates
                self.rejected += ack.rejected
            if ack.rejected:
                log.warning("the sidecar rejected %d usage events: %s", ack.rejected, ack.first_error)

    def close(self, timeout_s: float = SHUTDOWN_FLUSH_S) -> dict[str, int]:
        """Stop accepting events, send what is queued (up to ``timeout_s``), count the rest as lost."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout_s)
        with self._cond:
            left = len(self._queue) + len(self._retry or ())
            self.lost += left
            self._queue.clear()
            self._retry = None
        return self.stats()


_batchers: dict[tuple[Any, ...], UsageBatcher] = {}
_batchers_lock = threading.Lock()


def batcher_for(
    client: SidecarClient, address: Address, queue_size: int, batch_size: int, flush_interval_s: float
) -> UsageBatcher:
    """The process's batcher for this sidecar and queue settings: plugin instances
    configured alike (the usual case) share one queue and one sender thread."""
    full_key = (address, queue_size, batch_size, flush_interval_s)
    with _batchers_lock:
        batcher = _batchers.get(full_key)
        if batcher is None:
            batcher = UsageBatcher(client, queue_size, batch_size, flush_interval_s)
            _batchers[full_key] = batcher
        return batcher


def format_stats(stats: dict[str, int]) -> str:
    return " ".join(f"{name}={value}" for name, value in stats.items())


def shutdown(timeout_s: float = SHUTDOWN_FLUSH_S) -> list[dict[str, int]]:
    """Flush and stop every batcher (at plugin-server exit); log and return their stats."""
    with _batchers_lock:
        batchers = list(_batchers.values())
        _batchers.clear()
    deadline = time.monotonic() + timeout_s
    results = []
    for batcher in batchers:
        stats = batcher.close(max(0.0, deadline - time.monotonic()))
        level = logging.WARNING if stats["dropped"] or stats["lost"] else logging.INFO
        log.log(level, "usage stats: %s", format_stats(stats))
        results.append(stats)
    return results
