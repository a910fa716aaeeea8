"""Domain models as msgspec Structs, with the validation rules of each."""

from __future__ import annotations

import enum
import re

import msgspec

from sidecar.core.errors import InvalidInput, shown
from sidecar.core.money import MAX_MICROS
from sidecar.core.wallet_rules import AutoTopup
from sidecar.core.windows import WINDOWS, parse_window

# Tenants become part of Redis keys and of the cluster hash tag `{tenant:consumer}`:
# no braces, no colon, no whitespace.
TENANT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Consumer ids come from gateways (Kong UUIDs, Apigee app ids, custom ids). Braces
# would break the hash tag, a slash could not be named in an admin URL path, and
# whitespace and control characters are never legitimate; "." and ".." would be
# resolved away as URL path segments, so no plain admin URL could name them.
CONSUMER_ID_CHARS = r"[A-Za-z0-9._~@:+=-]{1,200}"
CONSUMER_ID_RE = re.compile(r"(?!\.\.?\Z)" + CONSUMER_ID_CHARS)
PLAN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
PRODUCT_RE = re.compile(r"[^\s|{}\x00-\x1f\x7f]{1,200}")
REQUEST_ID_RE = re.compile(r"[\x21-\x7e]{1,200}")
MAX_LIMIT = 2**53 - 1
MAX_HITS = 1_000_000
DEFAULT_TENANT = "default"


class ConsumerStatus(enum.StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"
    REVOKED = "revoked"


class WalletMode(enum.StrEnum):
    # Calls are refused when the balance does not cover their cost.
    PREPAID = "prepaid"
    # Calls are never refused for money; debits accrue and are invoiced later.
    POSTPAID = "postpaid"


# How an id rule reads in an error message, when its pattern is not plain enough.
_RULES = {CONSUMER_ID_RE.pattern: f"{CONSUMER_ID_CHARS}, not '.' or '..'"}


def check_id(value: str, pattern: re.Pattern[str], field: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        rule = _RULES.get(pattern.pattern, pattern.pattern)
        raise InvalidInput(
            f"{field} {shown(value)} is not valid (allowed: {rule})",
            code="invalid_identifier",
            field=field,
        )
    return value


class Plan(msgspec.Struct, forbid_unknown_fields=True):
    """A plan: quota per window, a price per call, and the products it grants."""

    id: str
    tenant: str = DEFAULT_TENANT
    windows: dict[str, int] = {}
    price: int = 0  # micros per call when the request names no cost
    products: list[str] = []  # empty: every product
    name: str = ""

    def validated(self) -> Plan:
        check_id(self.tenant, TENANT_RE, "tenant")
        check_id(self.id, PLAN_ID_RE, "id")
        for name, limit in self.windows.items():
            try:
                parse_window(name)
            except ValueError as exc:
                raise InvalidInput(str(exc), code="unknown_window", field=f"windows.{name}") from None
            if not 0 <= limit <= MAX_LIMIT:
                raise InvalidInput(
                    f"limit of window {name!r} must be between 0 and {MAX_LIMIT}",
                    code="invalid_limit",
                    field=f"windows.{name}",
                )
        if not 0 <= self.price <= MAX_MICROS:
            raise InvalidInput(
                f"price must be between 0 and {MAX_MICROS} micros", code="invalid_amount", field="price"
            )
        for product in self.products:
            check_id(product, PRODUCT_RE, "products[]")
        return self

    def limits(self) -> tuple[int | None, ...]:
        """Limits in ``WINDOWS`` order; ``None`` where the plan sets no limit."""
        return tuple(self.windows.get(w.value) for w in WINDOWS)


class ConsumerSpec(msgspec.Struct, forbid_unknown_fields=True):
    """A consumer (a Kong consumer, an Apigee developer app) bound to a plan, as an
    admin writes it. ``status`` and ``wallet_mode`` left out keep their current value
    (``active`` and ``prepaid`` on creation), so re-binding a plan never resumes a
    suspended consumer by accident."""

    id: str
    plan_id: str
    tenant: str = DEFAULT_TENANT
    status: ConsumerStatus | None = None
    wallet_mode: WalletMode | None = None
    # Hold a prepaid wallet when it runs dry (None keeps; on when first created).
    suspend_at_zero: bool | None = None
    auto_topup: AutoTopup | None = None  # None keeps; {"enabled": false} turns it off

    def validated(self) -> ConsumerSpec:
        check_id(self.tenant, TENANT_RE, "tenant")
        check_id(self.id, CONSUMER_ID_RE, "id")
        check_id(self.plan_id, PLAN_ID_RE, "plan_id")
        if self.auto_topup is not None:
            self.auto_topup.validated()
        return self


class ConsumerState(msgspec.Struct):
    """What the decision rule reads of a consumer: its binding and wallet, denormalised."""

    status: ConsumerStatus
    plan_id: str
    limits: tuple[int | None, ...]
    price: int
    products: tuple[str, ...]
    wallet_mode: WalletMode
    base: int  # balance as of the last settlement
    pending: int  # debits since the last settlement
    held: bool = False  # the wallet's own suspension (wallet_empty), apart from status

    @property
    def balance(self) -> int:
        return self.base - self.pending


class ConsumerView(msgspec.Struct):
    """A consumer as the admin API shows it."""

    tenant: str
    id: str
    plan_id: str
    status: ConsumerStatus
    wallet_mode: WalletMode
    balance: int
    pending: int
    version: int
    windows: dict[str, int]  # used count of each limited window, current period
    # "manual" (an admin suspended or revoked it) or "wallet_empty" (held by the wallet
    # rules until a top-up); None while active.
    status_reason: str | None = None
    suspended_at: int | None = None  # ms of the last wallet hold
    resumed_at: int | None = None  # ms the last hold was lifted by a top-up
    suspend_at_zero: bool = True
    auto_topup: AutoTopup | None = None


class ConsumerKey(msgspec.Struct, frozen=True, order=True):
    """An API key of a consumer: its hash (the raw key is never kept), when it was
    registered (None: before the sidecar kept that), when it stops working (None:
    never) and the scopes it is limited to (empty: every product of the plan; see
    sidecar/core/api_keys.py for what a scope matches)."""

    key_hash: str
    created_ms: int | None = None
    expires_ms: int | None = None
    scopes: tuple[str, ...] = ()


class AuthorizeRequest(msgspec.Struct, forbid_unknown_fields=True):
    """May this consumer call this product now, at this cost?

    The consumer is named by ``consumer_id`` or by a raw ``api_key`` (hashed, looked up,
    never stored). ``cost`` is in micros; when absent the plan's price applies. ``hits``
    is how much quota the call consumes in every window.
    """

    product: str
    tenant: str = DEFAULT_TENANT
    consumer_id: str | None = None
    api_key: str | None = None
    operation: str = ""
    cost: int | None = None
    hits: int = 1
    request_id: str | None = None

    def validated(self) -> AuthorizeRequest:
        check_id(self.tenant, TENANT_RE, "tenant")
        if (self.consumer_id is None) == (self.api_key is None):
            raise InvalidInput(
                "exactly one of consumer_id and api_key is required",
                code="missing_consumer",
                field="consumer_id",
            )
        if self.consumer_id is not None:
            check_id(self.consumer_id, CONSUMER_ID_RE, "consumer_id")
        if self.api_key is not None and not 8 <= len(self.api_key) <= 512:
            raise InvalidInput("api_key must be 8 to 512 characters", code="invalid_key", field="api_key")
        check_id(self.product, PRODUCT_RE, "product")
        if len(self.operation) > 512:
            raise InvalidInput("operation is longer than 512 characters", field="operation")
        if "\x00" in self.operation:  # it reaches Postgres with the usage record
            raise InvalidInput("operation may not hold the NUL character", field="operation")
        if self.cost is not None and not 0 <= self.cost <= MAX_MICROS:
            raise InvalidInput(
                f"cost must be between 0 and {MAX_MICROS} micros", code="invalid_amount", field="cost"
            )
        if not 1 <= self.hits <= MAX_HITS:
            raise InvalidInput(f"hits must be between 1 and {MAX_HITS}", field="hits")
        if self.request_id is not None:
            check_id(self.request_id, REQUEST_ID_RE, "request_id")
        return self


class Outcome(msgspec.Struct, array_like=True):
    """What a store answers for one decision, before it is dressed for the caller.

    ``used`` and ``limits`` are in ``WINDOWS`` order, ``None`` for an unlimited window;
    ``used`` is the count after this decision. ``retry_at_ms`` is when a quota denial
    may succeed (0 otherwise).
    """

    reason: str
    charged: int
    balance: int | None
    decision_id: str
    retry_at_ms: int
    used: tuple[int | None, ...]
    limits: tuple[int | None, ...]
    replayed: bool = False


class UsageRecord(msgspec.Struct):
    """One allowed call as the usage stream holds it, for billing."""

    request_id: str
    decision_id: str
    ts_ms: int
    tenant: str
    consumer_id: str
    product: str
    operation: str
    cost: int
    hits: int
    # The quota levels this call took a window across (sidecar/core/alerts.py), '' if none.
    crossings: str = ""


MAX_EVENT_HEADERS = 32


class UsageEvent(msgspec.Struct, forbid_unknown_fields=True):
    """What a gateway observed of one proxied request (the Kong plugin's log phase, an
    ingested access log). Deduplicated on (tenant, consumer_id, request_id). Sizes in
    bytes, times in ms; ``headers`` holds only allow-listed headers, never bodies."""

    consumer_id: str
    request_id: str
    tenant: str = DEFAULT_TENANT
    product: str = ""
    route: str = ""
    service: str = ""
    method: str = ""
    status: int = 0
    started_at_ms: int = 0
    latency_ms: int = 0
    upstream_latency_ms: int = 0
    gateway_latency_ms: int = 0
    request_size: int = 0
    response_size: int = 0
    decision_id: str = ""
    headers: dict[str, str] = {}
    # An aggregated record (Apigee analytics) stands for `count` requests, `errors` of
    # them failed; a per-request event is count 1.
    count: int = 1
    errors: int = 0

    def validated(self) -> UsageEvent:
        check_id(self.tenant, TENANT_RE, "tenant")
        check_id(self.consumer_id, CONSUMER_ID_RE, "consumer_id")
        check_id(self.request_id, REQUEST_ID_RE, "request_id")
        if not 0 <= self.status <= 999:
            raise InvalidInput("status must be between 0 and 999", field="status")
        for name in (
            "started_at_ms",
            "latency_ms",
            "upstream_latency_ms",
            "gateway_latency_ms",
            "request_size",
            "response_size",
            "count",
            "errors",
        ):
            if not 0 <= getattr(self, name) <= MAX_LIMIT:
                raise InvalidInput(f"{name} must be between 0 and {MAX_LIMIT}", field=name)
        for name in ("product", "route", "service", "method", "decision_id"):
            if len(getattr(self, name)) > 512:
                raise InvalidInput(f"{name} is longer than 512 characters", field=name)
            if "\x00" in getattr(self, name):  # Postgres text holds no NUL
                raise InvalidInput(f"{name} may not hold the NUL character", field=name)
        if len(self.headers) > MAX_EVENT_HEADERS or any(
            len(k) > 256 or len(v) > 2048 or "\x00" in k + v for k, v in self.headers.items()
        ):
            raise InvalidInput(
                f"at most {MAX_EVENT_HEADERS} headers, names up to 256 and values up to 2048 characters",
                field="headers",
            )
        return self


class WindowStatus(msgspec.Struct):
    window: str
    limit: int
    remaining: int
    reset: int  # epoch seconds at which the window resets


class Decision(msgspec.Struct, omit_defaults=False):
    allow: bool
    reason: str
    status: int
    decision_id: str
    request_id: str
    tenant: str
    consumer_id: str | None
    product: str
    ttl_seconds: int
    retry_after: int | None
    windows: list[WindowStatus]
    balance: int | None  # remaining balance in micros after this decision
    charged: int  # micros debited by this decision
    degraded: bool = False
    replayed: bool = False
