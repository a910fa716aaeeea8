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


# Resolved once: labels() validates and locks on every call, the decision path need not.
DECISIONS_BY_REASON = {reason.value: DECISIONS.labels(reason.value) for reason in Reason}


def render() -> tuple[bytes, str]:
    """The exposition text and its content type."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
