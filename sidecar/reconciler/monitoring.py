"""The reconciler's Prometheus metrics and their endpoint.

The reconciler serves no HTTP otherwise, so /metrics gets a port of its own
(reconciler_metrics_port). It serves the default registry: the series below, the
webhook deliveries the dispatcher counts (sidecar/metrics.py), the Redis breaker
and the process's own (CPU, memory, file descriptors)."""

from __future__ import annotations

import logging
from wsgiref.simple_server import WSGIServer

from prometheus_client import Counter, Gauge, start_http_server

from sidecar.metrics import WEBHOOK_DELIVERIES

log = logging.getLogger("aforo.reconciler")

STREAMS_WAITING = Gauge(
    "aforo_reconciler_streams_waiting",
    "Streams marked dirty by sidecars and not drained yet, counted after each drain pass "
    "(the backlog: it grows when the drain falls behind).",
)
LAST_DRAIN = Gauge(
    "aforo_reconciler_last_drain_timestamp_seconds",
    "Unix time at which the last drain pass completed (0: none since the process started).",
)
DRAINED = Counter(
    "aforo_reconciler_drained_total",
    "Rows the drain wrote to Postgres: usage (ledger rows), events (gateway events), "
    "notices (wallet notices).",
    ["kind"],
)
INTERRUPTIONS = Counter(
    "aforo_reconciler_interruptions_total",
    "Reconciler sessions ended by a recoverable failure (Postgres or Redis away), each retried with backoff.",
)

_DRAINED = {kind: DRAINED.labels(kind) for kind in ("usage", "events", "notices")}
# Every result present at 0 from the start: Prometheus sees no increase in a series
# whose first sample is already 1, so a first gave_up would otherwise go unnoticed.
for _result in ("delivered", "failed", "gave_up"):
    WEBHOOK_DELIVERIES.labels(_result)


class MetricsPortBusy(RuntimeError):
    """The metrics port cannot be listened on."""


def serve(host: str, port: int) -> WSGIServer | None:
    """Serve /metrics on ``host``:``port`` from a daemon thread; None when port is 0."""
    if not port:
        return None
    try:
        server, _ = start_http_server(port, addr=host)
    except OSError as exc:
        raise MetricsPortBusy(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}), the reconciler's metrics port: "
            "set AFORO_RECONCILER_METRICS_PORT (0 turns it off)"
        ) from None
    log.info("metrics on http://%s:%d/metrics", host, port)
    return server


def drained(usage: int, events: int, notices: int, waiting: int) -> None:
    """After a drain pass: what it wrote, and the streams still marked dirty."""
    _DRAINED["usage"].inc(usage)
    _DRAINED["events"].inc(events)
    _DRAINED["notices"].inc(notices)
    STREAMS_WAITING.set(waiting)
    LAST_DRAIN.set_to_current_time()
