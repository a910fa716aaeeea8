"""Prometheus metrics of the decision path, shared by every transport.

With several worker processes, ``serve`` points PROMETHEUS_MULTIPROC_DIR at a fresh
directory before the workers start, and ``render`` aggregates all of them.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from sidecar.core.reasons import Reason

DECISIONS = Counter("aforo_decisions_total", "Authorize decisions, by reason code.", ["reason"])
STANDING_DENIALS = Counter(
    "aforo_standing_denials_total",
    "Decisions answered from this process's standing denials, without Redis.",
)
DEGRADED = Counter(
    "aforo_degraded_decisions_total", "Decisions answered by the fail mode (store unreachable)."
)
DECISION_SECONDS = Histogram(
    "aforo_decision_seconds",
    "Time to decide, from a parsed request to a decision (store round trip included).",
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
STORE_ERRORS = Counter(
    "aforo_store_errors_total",
    "Store calls that failed or timed out: decide, http (admin, usage, ingestion), grpc.",
    ["operation"],
)
TLS_RELOADS = Counter(
    "aforo_tls_reloads_total",
    "Certificate reloads on SIGHUP: ok, or failed (the files did not load; the certificates in use stay).",
    ["result"],
)
AUTH_FAILURES = Counter(
    "aforo_auth_failures_total",
    "Refused authentications and authorisations of the admin API: missing, invalid, "
    "admin_disabled, forbidden (a role short), rate_limited (too many failures from one address).",
    ["reason"],
)
WEBHOOK_DELIVERIES = Counter(
    "aforo_webhook_deliveries_total",
    "Webhook delivery attempts by the reconciler: delivered (2xx), failed (to be retried), "
    "gave_up (failed past the retry period; redeliver by hand).",
    ["result"],
)
STORE_BREAKER_OPEN = Gauge(
    "aforo_store_breaker_open",
    "1 while the breaker of a Redis node is open (a refused or lost connection, or missed "
    "deadlines: its commands fail at once for breaker_cooldown_ms), 0 once it is tried again.",
    ["node"],
    multiprocess_mode="max",  # several workers: open if open in any of them
)


def store_breaker(node: str, is_open: bool) -> None:
    """Called on the breaker's transitions only, never per decision."""
    STORE_BREAKER_OPEN.labels(node).set(1 if is_open else 0)


# Resolved once: labels() validates and locks on every call, the decision path need not.
DECISIONS_BY_REASON = {reason.value: DECISIONS.labels(reason.value) for reason in Reason}


def render() -> tuple[bytes, str]:
    """The exposition text and its content type."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
