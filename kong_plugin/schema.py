"""The plugin's configuration: the schema Kong validates (``SCHEMA``, in Kong's schema
language, sent to Kong by ``--dump``) and the typed ``Config`` an instance runs with.

Kong validates a plugin's config against ``SCHEMA`` when an admin creates it and sends
every field to ``plugin.StartInstance`` (defaults filled, unset optional fields as
null). ``Config.parse`` checks the same rules again, so a config that did not come
through Kong's Admin API (declarative files, an older Kong) fails at StartInstance with
a message naming the field instead of misbehaving per request.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass, field
from typing import Any

from kong_plugin.client import Address, Tls

# The sidecar's own rules for a tenant and a product (sidecar/core/models.py), written
# here because the plugin ships to Kong hosts without the service; tests/test_boundaries.py
# keeps the two the same.
TENANT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
PRODUCT_RE = re.compile(r"[^\s|{}\x00-\x1f\x7f]{1,200}")
MAX_MICROS = 2**53 - 1
IDENTITIES = ("consumer_id", "custom_id", "username", "credential", "api_key")
# Headers that carry secrets never leave Kong in a usage event, whatever the allow-list says.
SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})
HEADER_NAME_RE = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,256}")
# host:port, [v6]:port, dns:///name:port, unix:/path (any gRPC target without spaces).
GRPC_TARGET_RE = re.compile(r"\S{1,512}")
HTTP_URL_RE = re.compile(r"https?://[^\s/]+(/\S*)?")


def _field(kind: str, description: str, **attrs: Any) -> dict[str, Any]:
    return {"type": kind, "description": description, **attrs}


# Kong's schema language (kong/db/schema/metaschema.lua): a list of one-key maps.
# `description` needs Kong 3.4 or later.
SCHEMA: list[dict[str, dict[str, Any]]] = [
    {
        "grpc_target": _field(
            "string",
            "The sidecar's gRPC address (host:port), used for every decision and usage batch.",
            default="127.0.0.1:9090",
            required=True,
        )
    },
    {
        "http_url": _field(
            "string",
            "The sidecar's HTTP base URL: POST /v1/authorize and /v1/usage, the fallback transport.",
            default="http://127.0.0.1:8080",
            required=True,
        )
    },
    {
        "decision_url": _field(
            "string",
            "HTTP base URL for decisions only, e.g. the sidecar's decision port "
            "(http://sidecar:8081); unset: http_url.",
        )
    },
    {
        "protocol": _field(
            "string",
            "Primary transport to the sidecar: grpc (default) or http.",
            default="grpc",
            one_of=["grpc", "http"],
            required=True,
        )
    },
    {
        "http_fallback": _field(
            "boolean",
            "With protocol grpc: use HTTP when the gRPC channel is unavailable.",
            default=True,
            required=True,
        )
    },
    {
        "gateway_token": _field(
            "string",
            "The gateway token a sidecar with require_gateway_token needs: an API token of "
            "the tenant with the gateway role (aft_...), sent on every call. Keep it in a "
            "Kong vault ({vault://...}).",
            referenceable=True,
            encrypted=True,
        )
    },
    {
        "grpc_tls": _field(
            "boolean",
            "Speak TLS to the sidecar's gRPC port (a sidecar with AFORO_TLS_CERT_FILE). "
            "HTTP uses TLS for https:// URLs.",
            default=False,
            required=True,
        )
    },
    {
        "tls_ca_file": _field(
            "string",
            "PEM file of the CA that signed the sidecar's certificate, on the Kong host; "
            "unset: the system's CAs.",
        )
    },
    {
        "tls_client_cert_file": _field(
            "string",
            "PEM file of the plugin's client certificate, for a sidecar that requires "
            "mutual TLS (AFORO_TLS_CLIENT_CA_FILE); with tls_client_key_file.",
        )
    },
    {
        "tls_client_key_file": _field(
            "string",
            "PEM file of that certificate's private key.",
        )
    },
    {
        "timeout_ms": _field(
            "integer",
            "Time budget of one decision across all transports, in milliseconds.",
            default=50,
            between=[1, 10_000],
            required=True,
        )
    },
    {
        "fail_mode": _field(
            "string",
            "When the sidecar cannot be reached in time: open (proxy) or closed (503).",
            default="open",
            one_of=["open", "closed"],
            required=True,
        )
    },
    {
        "tenant": _field(
            "string",
            "The sidecar tenant the consumers and plans belong to.",
            default="default",
            required=True,
        )
    },
    {
        "consumer_identity": _field(
            "string",
            "How the sidecar consumer is named: the Kong consumer's id, custom_id or username, "
            "the authenticated credential's id, or an API key header the sidecar hashes and looks up.",
            default="consumer_id",
            one_of=list(IDENTITIES),
            required=True,
        )
    },
    {
        "api_key_header": _field(
            "string",
            "With consumer_identity api_key: the request header carrying the key.",
            default="x-api-key",
            required=True,
        )
    },
    {
        "product": _field(
            "string",
            "The product to authorize; unset: the name of the service or route (product_from).",
        )
    },
    {
        "product_from": _field(
            "string",
            "With no product set: take the Kong service's or the route's name (id when unnamed).",
            default="service",
            one_of=["service", "route"],
            required=True,
        )
    },
    {
        "cost": _field(
            "integer",
            "Cost of one call in micro-units (1.00 = 1000000); unset: the plan's price.",
            between=[0, MAX_MICROS],
        )
    },
    {
        "cost_header": _field(
            "string",
            "A request header whose value (micro-units) overrides cost for that request.",
        )
    },
    {
        "hits": _field(
            "integer",
            "Quota units one call consumes in every window.",
            default=1,
            between=[1, 1_000_000],
            required=True,
        )
    },
    {
        "rate_limit_headers": _field(
            "boolean",
            "Add X-RateLimit-Limit/Remaining/Reset-<Window> headers to responses.",
            default=True,
            required=True,
        )
    },
    {
        "balance_header": _field(
            "boolean",
            "Add X-Aforo-Balance (remaining wallet balance, currency units) to responses.",
            default=True,
            required=True,
        )
    },
    {
        "upstream_headers": _field(
            "boolean",
            "Send X-Aforo-Decision-Id and X-Aforo-Consumer-Id to the upstream service.",
            default=False,
            required=True,
        )
    },
    {
        "usage": _field(
            "boolean",
            "Report every proxied request to the sidecar as a usage event (log phase).",
            default=True,
            required=True,
        )
    },
    {
        "usage_headers": _field(
            "array",
            "Request headers copied into usage events (allow-list; secrets are never copied).",
            elements={"type": "string"},
            default=["user-agent"],
            required=True,
        )
    },
    {
        "usage_queue_size": _field(
            "integer",
            "Usage events held in the plugin server while waiting to be sent; beyond it "
            "new events are dropped and counted.",
            default=10_000,
            between=[1, 1_000_000],
            required=True,
        )
    },
    {
        "usage_batch_size": _field(
            "integer",
            "Usage events sent to the sidecar in one call.",
            default=200,
            between=[1, 1_000],
            required=True,
        )
    },
    {
        "usage_flush_interval_ms": _field(
            "integer",
            "Longest time an event waits before a partial batch is sent.",
            default=1_000,
            between=[10, 60_000],
            required=True,
        )
    },
]

DEFAULTS: dict[str, Any] = {name: spec.get("default") for entry in SCHEMA for name, spec in entry.items()}


class ConfigError(ValueError):
    """A plugin configuration the plugin cannot run with; the message names the field."""


@dataclass(frozen=True, slots=True)
class Config:
    grpc_target: str
    http_url: str
    decision_url: str | None
    protocol: str
    http_fallback: bool
    gateway_token: str | None = field(repr=False)  # a secret: never in a log line
    grpc_tls: bool
    tls_ca_file: str | None
    tls_client_cert_file: str | None
    tls_client_key_file: str | None
    timeout_ms: int
    fail_mode: str
    tenant: str
    consumer_identity: str
    api_key_header: str
    product: str | None
    product_from: str
    cost: int | None
    cost_header: str | None
    hits: int
    rate_limit_headers: bool
    balance_header: bool
    upstream_headers: bool
    usage: bool
    usage_headers: tuple[str, ...]
    usage_queue_size: int
    usage_batch_size: int
    usage_flush_interval_ms: int

    @property
    def fail_open(self) -> bool:
        return self.fail_mode == "open"

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> Config:
        """The config Kong sent (a decoded JSON object), checked against ``SCHEMA``."""
        if not isinstance(raw, dict):
            raise ConfigError(f"config must be an object, got {type(raw).__name__}")
        # Kong adds bookkeeping keys (__plugin_id, __key__, __seq__) to every config.
        unknown = sorted(k for k in raw if not k.startswith("__") and k not in DEFAULTS)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        values: dict[str, Any] = {}
        for entry in SCHEMA:
            for name, spec in entry.items():
                value = raw.get(name)
                if value is None:
                    value = spec.get("default")
                values[name] = _check(name, spec, value)
        values["usage_headers"] = tuple(h.lower() for h in values["usage_headers"])
        values["api_key_header"] = values["api_key_header"].lower()
        if values["cost_header"] is not None:
            values["cost_header"] = values["cost_header"].lower()
        config = cls(**values)
        config._check_values()
        return config

    def _check_values(self) -> None:
        if not TENANT_RE.fullmatch(self.tenant):
            raise ConfigError(f"tenant {self.tenant!r} is not a valid tenant ({TENANT_RE.pattern})")
        if self.product is not None and not PRODUCT_RE.fullmatch(self.product):
            raise ConfigError(f"product {self.product!r} is not a valid product ({PRODUCT_RE.pattern})")
        if not GRPC_TARGET_RE.fullmatch(self.grpc_target):
            raise ConfigError(f"grpc_target {self.grpc_target!r} is not a gRPC target")
        for name, url in (("http_url", self.http_url), ("decision_url", self.decision_url)):
            if url is not None and not HTTP_URL_RE.fullmatch(url):
                raise ConfigError(f"{name} {url!r} is not an http(s) URL")
        for name in (self.api_key_header, self.cost_header, *self.usage_headers):
            if name is not None and not HEADER_NAME_RE.fullmatch(name):
                raise ConfigError(f"{name!r} is not a valid header name")
        self._check_tls()

    @property
    def tls(self) -> Tls:
        return Tls(self.grpc_tls, self.tls_ca_file, self.tls_client_cert_file, self.tls_client_key_file)

    @property
    def address(self) -> Address:
        return Address(
            self.grpc_target,
            self.http_url,
            self.protocol,
            self.http_fallback,
            self.decision_url,
            self.gateway_token,
            self.tls,
        )

    def _check_tls(self) -> None:
        """Files that do not load fail here, naming the field, not on every request."""
        if (self.tls_client_cert_file is None) != (self.tls_client_key_file is None):
            raise ConfigError("tls_client_cert_file and tls_client_key_file go together")
        try:
            self.tls.ssl_context()
        except FileNotFoundError as exc:
            raise ConfigError(f"TLS file not found: {exc.filename}") from None
        except (OSError, ssl.SSLError) as exc:
            names = "tls_ca_file / tls_client_cert_file / tls_client_key_file"
            raise ConfigError(f"{names} do not load: {exc}") from None


def _check(name: str, spec: dict[str, Any], value: Any) -> Any:
    """One field against its schema entry (the subset of Kong's rules SCHEMA uses)."""
    if value is None:
        if spec.get("required"):
            raise ConfigError(f"{name} is required")
        return None
    kind = spec["type"]
    if kind == "string":
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{name} must be a non-empty string")
    elif kind == "integer":
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # JSON numbers from Lua may arrive as 50.0
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{name} must be an integer")
    elif kind == "boolean":
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be a boolean")
    elif kind == "array":
        if value == {}:
            value = []  # an empty Lua table may be encoded as a JSON object
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{name} must be an array of non-empty strings")
    if "one_of" in spec and value not in spec["one_of"]:
        raise ConfigError(f"{name} must be one of: {', '.join(spec['one_of'])}")
    if "between" in spec:
        low, high = spec["between"]
        if not low <= value <= high:
            raise ConfigError(f"{name} must be between {low} and {high}")
    return value
