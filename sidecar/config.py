"""One Settings object, read from the environment (AFORO_*) and CLI flags, validated
once at start with a message that names the bad value."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, Literal, get_args, get_type_hints
from urllib.parse import urlparse

import msgspec

from sidecar.core.models import TENANT_RE
from sidecar.integrations.secret_box import SecretBox, SecretBoxError
from sidecar.store.target import RedisTarget, RedisTargetError, Topology, parse_redis_target

ENV_PREFIX = "AFORO_"
FailMode = Literal["open", "closed"]


class SettingsError(ValueError):
    """A configuration value is invalid; the message says which and why."""


class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Hot store. Unset: the embedded in-process store (one process, nothing shared).
    # redis://, rediss://, unix://, redis+cluster://, redis+sentinel:// (store/target.py).
    redis_url: str | None = None
    # auto: the URL's scheme says, and a plain redis:// node is asked whether it is a
    # cluster node at start; or standalone, cluster, sentinel.
    redis_topology: Topology = "auto"
    # The sentinels' own password, when they require one (the URL's is the data nodes').
    redis_sentinel_password: str | None = None
    key_prefix: str = "aforo:"
    redis_connect_timeout_ms: int = 250
    redis_max_connections: int = 256
    # HTTP server.
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    max_body_bytes: int = 65_536
    # The decision port: only the decision endpoints, served by a lean HTTP/1.1 server
    # (the fast path for gateways); 0 turns it off.
    decision_port: int = 8081
    # gRPC server (Sidecar + Envoy RateLimitService), beside HTTP; 0 turns it off.
    grpc_port: int = 9090
    max_batch_items: int = 1_000
    # Decisions.
    decision_timeout_ms: int = 50
    fail_mode: FailMode = "open"
    tenant_fail_modes: dict[str, FailMode] = {}
    breaker_cooldown_ms: int = 500
    # A decision that reaches Redis later than its deadline plus this margin (the clock
    # skew tolerated between sidecar and Redis hosts) is discarded unapplied: a call
    # answered by the fail mode is not counted or charged behind its back once it is
    # that late. One delayed by less than the margin may still apply.
    late_apply_margin_ms: int = 1_000
    idempotency_ttl_seconds: int = 86_400
    # Gateway usage events resent within this time are recognised as duplicates (and so
    # never rated twice): a day by default, the late-data window gateways re-send in.
    event_dedupe_ttl_seconds: int = 86_400
    deny_ttl_seconds: int = 5
    # Answer denials that stand (suspended, revoked, unknown, a window used up) from this
    # process's memory, without Redis, while the invalidation channel is up.
    standing_denials: bool = True
    quota_ttl_cap_seconds: int = 60
    # Usage ingestion (Kong HTTP Log, Apigee analytics): a shared secret per tenant
    # ("tenant=secret,..."), sent in the X-Aforo-Ingest-Secret header; a tenant with no
    # secret cannot ingest.
    ingest_secrets: dict[str, str] = {}
    ingest_max_body_bytes: int = 16 * 1024 * 1024
    ingest_max_events: int = 10_000  # per request
    # Events being written to Redis at once; past it, ingestion answers 503 Retry-After
    # instead of queueing without bound.
    ingest_max_in_flight: int = 100_000
    # Request headers kept from ingested logs (lower case); all others are dropped.
    ingest_header_allowlist: list[str] = msgspec.field(
        default_factory=lambda: ["user-agent", "content-type", "accept", "x-request-id"]
    )
    # Which Kong consumer field names the consumer: id, custom_id or username.
    kong_consumer_field: Literal["id", "custom_id", "username"] = "id"
    # Apigee analytics rows: "rate" counts and charges them (native enforcement: no
    # shared flow decides); "record" only stores them, for when the aforo-authorize
    # shared flow decides and charges every call (an aggregated row names no request
    # a decision could be matched with, so rating it would charge those calls twice).
    apigee_analytics: Literal["rate", "record"] = "rate"
    # Postgres, the source of truth. Unset: no Postgres (Redis or the embedded store is
    # all there is). Set: admin writes go to Postgres first; needs redis_url.
    database_url: str | None = None
    drain_interval_ms: int = 250
    drain_batch: int = 1_000
    full_sync_interval_seconds: int = 300
    # Between these scans the reconciler drains only the streams sidecars marked dirty.
    stream_scan_interval_seconds: int = 60
    # The reconciler's Prometheus endpoint (/metrics on host): its lag, backlog and
    # webhook deliveries; 0 turns it off. `serve` has /metrics on its HTTP port instead.
    reconciler_metrics_port: int = 9466
    drift_threshold_pct: float = 2.0
    # The reconciler compares each UTC day with the gateway's counts this many hours after
    # it ends (gateways report late: Apigee analytics up to 25 h); on demand any time.
    gateway_drift_delay_hours: int = 2
    # Reconciler: drop the monthly partitions of usage_records and gateway_events whose
    # month ended more than this many months ago (the rollups stay); 0 keeps them forever.
    usage_retention_months: int = 0
    # Webhook deliveries (the reconciler sends them): each retried with exponential
    # backoff and jitter, from webhook_retry_first_seconds doubling up to
    # webhook_retry_max_seconds apart, for webhook_retry_hours after the event, then
    # given up (redeliverable by hand). A receiver has webhook_timeout_seconds to answer.
    webhook_retry_first_seconds: int = 5
    webhook_retry_max_seconds: int = 3_600
    webhook_retry_hours: int = 24
    webhook_timeout_seconds: int = 10
    webhook_concurrency: int = 16  # deliveries in flight at once
    webhook_poll_ms: int = 1_000  # how often pending deliveries are looked for when idle
    # Keys that seal gateway connection secrets at rest (AES-256-GCM): "id=<base64 of
    # 32 random bytes>,...". The first seals; all open (put a new key first to rotate).
    secret_keys: dict[str, str] = {}
    # Admin API: bearer token; unset disables every admin endpoint (401).
    admin_token: str | None = None
    # Gateway-facing calls (decisions on every port, usage reports, the gRPC calls) need a
    # gateway token of their tenant (sidecar/gateway_tokens.py). Off: whoever reaches
    # the port may call them (a loopback sidecar).
    require_gateway_token: bool = False
    # TLS on the HTTP port, the decision port and gRPC (PEM files; sidecar/tls.py): a
    # certificate and its key turn it on; a client CA requires client certificates it
    # signed (mutual TLS).
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None
    # API key introspection calls each caller (a token) may make a second.
    introspect_per_second: int = 1000
    # Failed authentications a source address may make (each within 60 s of the one
    # before) before it gets 429 too_many_auth_failures until 60 s pass without one.
    auth_failure_limit: int = 20
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    def fail_open(self, tenant: str) -> bool:
        return self.tenant_fail_modes.get(tenant, self.fail_mode) == "open"

    def redis_target(self) -> RedisTarget:
        """The Redis deployment redis_url names (validate() has checked it)."""
        assert self.redis_url is not None
        return parse_redis_target(self.redis_url, self.redis_topology, self.redis_sentinel_password)

    def validate(self) -> Settings:
        if self.redis_url is not None:
            try:
                self.redis_target()
            except RedisTargetError as exc:
                raise SettingsError(str(exc)) from None
        elif self.redis_topology != "auto" or self.redis_sentinel_password is not None:
            raise SettingsError("redis_topology and redis_sentinel_password need redis_url")
        if self.database_url is not None and urlparse(self.database_url).scheme not in (
            "postgres",
            "postgresql",
        ):
            raise SettingsError(
                f"database_url {self.database_url!r} is not a Postgres URL (expected postgresql://...)"
            )
        if not 0 <= self.drift_threshold_pct <= 100:
            raise SettingsError(f"drift_threshold_pct {self.drift_threshold_pct} is out of range 0-100")
        if not 1 <= self.port <= 65535:
            raise SettingsError(f"port {self.port} is out of range 1-65535")
        if not 0 <= self.grpc_port <= 65535:
            raise SettingsError(f"grpc_port {self.grpc_port} is out of range 0-65535 (0 turns gRPC off)")
        if not 0 <= self.decision_port <= 65535:
            raise SettingsError(
                f"decision_port {self.decision_port} is out of range 0-65535 (0 turns it off)"
            )
        taken = [p for p in (self.port, self.decision_port, self.grpc_port) if p]
        if len(taken) != len(set(taken)):
            raise SettingsError(
                f"port ({self.port}), decision_port ({self.decision_port}) and grpc_port "
                f"({self.grpc_port}) must differ"
            )
        if not 1 <= self.workers <= 64:
            raise SettingsError(f"workers {self.workers} is out of range 1-64")
        if self.workers > 1 and self.redis_url is None:
            raise SettingsError(
                "workers > 1 needs redis_url: the embedded store lives in one process, "
                "so several workers would each count on their own"
            )
        for name, low, high in (
            ("decision_timeout_ms", 1, 60_000),
            ("redis_connect_timeout_ms", 1, 60_000),
            ("redis_max_connections", 1, 100_000),
            ("max_body_bytes", 256, 64 * 1024 * 1024),
            ("breaker_cooldown_ms", 0, 600_000),
            ("late_apply_margin_ms", 0, 3_600_000),
            ("idempotency_ttl_seconds", 1, 90 * 86_400),
            ("event_dedupe_ttl_seconds", 1, 90 * 86_400),
            ("max_batch_items", 1, 100_000),
            ("introspect_per_second", 1, 1_000_000),
            ("auth_failure_limit", 1, 1_000_000),
            ("ingest_max_body_bytes", 1024, 512 * 1024 * 1024),
            ("ingest_max_events", 1, 1_000_000),
            ("ingest_max_in_flight", 1, 100_000_000),
            ("drain_interval_ms", 10, 600_000),
            ("drain_batch", 1, 100_000),
            ("full_sync_interval_seconds", 1, 86_400 * 7),
            ("stream_scan_interval_seconds", 1, 86_400),
            ("usage_retention_months", 0, 1200),
            ("reconciler_metrics_port", 0, 65535),
            ("gateway_drift_delay_hours", 0, 72),
            ("webhook_retry_first_seconds", 1, 3_600),
            ("webhook_retry_max_seconds", 1, 86_400),
            ("webhook_retry_hours", 24, 24 * 30),
            ("webhook_timeout_seconds", 1, 60),
            ("webhook_concurrency", 1, 1_000),
            ("webhook_poll_ms", 10, 60_000),
            ("deny_ttl_seconds", 0, 86_400),
            ("quota_ttl_cap_seconds", 0, 86_400 * 31),
        ):
            value = getattr(self, name)
            if not low <= value <= high:
                raise SettingsError(f"{name} {value} is out of range {low}-{high}")
        for tenant in self.tenant_fail_modes:
            if not TENANT_RE.fullmatch(tenant):
                raise SettingsError(f"tenant_fail_modes names an invalid tenant {tenant!r}")
        for tenant, secret in self.ingest_secrets.items():
            if not TENANT_RE.fullmatch(tenant):
                raise SettingsError(f"ingest_secrets names an invalid tenant {tenant!r}")
            if len(secret) < 16:
                raise SettingsError(f"the ingest secret of tenant {tenant!r} must be at least 16 characters")
        if self.secret_keys:
            try:
                SecretBox(self.secret_keys)
            except SecretBoxError as exc:
                raise SettingsError(f"secret_keys: {exc}") from None
        if "{" in self.key_prefix or "}" in self.key_prefix:
            raise SettingsError("key_prefix must not contain braces (they delimit hash tags)")
        if self.admin_token is not None and len(self.admin_token) < 16:
            raise SettingsError("admin_token must be at least 16 characters")
        return self

    def check_serving(self) -> Settings:
        """What serving adds to the rules (the data commands need less)."""
        if self.database_url is not None and self.redis_url is None:
            raise SettingsError(
                "database_url needs redis_url: Postgres is synced into Redis, not the embedded store"
            )
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise SettingsError("tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise SettingsError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise SettingsError(f"{name}: no such file {path!r}")
        if self.tls_cert_file is not None and self.tls_key_file is not None:
            import ssl

            from sidecar.tls import load_context  # imports this module: here, not at the top

            try:
                load_context(self.tls_cert_file, self.tls_key_file, self.tls_client_ca_file)
            except (ssl.SSLError, ValueError) as exc:
                raise SettingsError(f"the TLS files do not load: {exc}") from None
        return self

    def to_env(self) -> dict[str, str]:
        """The environment that rebuilds these settings (for worker processes)."""
        env: dict[str, str] = {}
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, dict):
                value = ",".join(f"{k}={v}" for k, v in value.items())
            elif isinstance(value, list):
                value = ",".join(value)
            env[ENV_PREFIX + name.upper()] = str(value)
        return env


def _parse_mapping(name: str, text: str) -> dict[str, str]:
    result: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SettingsError(f"{name} expects entries like tenant=closed, got {item!r}")
        result[key.strip()] = value.strip()
    return result


def load_settings(
    overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Build and validate Settings: defaults < environment (AFORO_*) < overrides."""
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    fields = set(Settings.__struct_fields__)
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        name = key[len(ENV_PREFIX) :].lower()
        if name not in fields:
            continue  # other AFORO_* variables belong to other tools (the plugin, tests)
        raw[name] = value
    for key, value in (overrides or {}).items():
        if value is not None:
            raw[key] = value
    for name in ("tenant_fail_modes", "ingest_secrets", "secret_keys"):
        if isinstance(raw.get(name), str):
            raw[name] = _parse_mapping(name, raw[name])
    if isinstance(raw.get("ingest_header_allowlist"), str):
        text = raw["ingest_header_allowlist"]
        raw["ingest_header_allowlist"] = [h.strip().lower() for h in text.split(",") if h.strip()]
    for key in (
        "redis_url",
        "admin_token",
        "database_url",
        "redis_sentinel_password",
        "tls_cert_file",
        "tls_key_file",
        "tls_client_ca_file",
    ):
        if raw.get(key) == "":
            raw[key] = None
    try:
        settings = msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise SettingsError(_explain(exc, raw)) from None
    return settings.validate()


def _explain(exc: msgspec.ValidationError, raw: Mapping[str, Any]) -> str:
    """A validation error in words: the setting, its variable, and for a choice the
    values it takes."""
    text = str(exc)
    found = re.search(r"at `\$\.(\w+)", text)
    if found is None or found.group(1) not in Settings.__struct_fields__:
        return f"invalid setting: {text} (environment variables are AFORO_<NAME>)"
    name = found.group(1)
    where = f"{ENV_PREFIX}{name.upper()}"
    choices = get_args(get_type_hints(Settings)[name])
    if choices and all(isinstance(c, str) for c in choices):
        return f"{name} {raw.get(name)!r} is not one of: {', '.join(choices)} ({where})"
    return f"{name}: {text.split(' - at ')[0]} ({where})"
