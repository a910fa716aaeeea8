"""Who may do what: API tokens, their roles and what each role may see. Pure.

A token belongs to one tenant and has one role:

- ``admin``: everything in its tenant, including minting and revoking tokens;
- ``billing``: reads, plus wallet top-ups and suspending / resuming / revoking consumers;
- ``viewer``: reads only;
- ``developer``: reads of the consumers it names (its own apps), nothing else;
- ``gateway``: the calls a gateway makes (decisions, usage, ingestion, key
  introspection), none of the admin API.

The environment's admin token (``AFORO_ADMIN_TOKEN``) is the bootstrap super-admin: every
tenant, every action. A raw token is ``aft_<id>_<secret>``: the id finds the record
without a scan, only the SHA-256 of the secret is kept, and the prefix makes a leaked
token recognisable (secret scanners). After a rotation the previous secret stays valid
until ``previous_until_ms`` (the grace period), so a deployment can roll over.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
import secrets

import msgspec

from sidecar.core.clock import check_lifetime
from sidecar.core.errors import InvalidInput
from sidecar.core.models import CONSUMER_ID_RE, TENANT_RE, check_id

TOKEN_PREFIX = "aft_"
TOKEN_ID_RE = re.compile(r"[0-9a-f]{16}")
_RAW_RE = re.compile(r"aft_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
MAX_NAME = 200
MAX_DEVELOPER_CONSUMERS = 1000
MAX_GRACE_SECONDS = 30 * 86_400


class Role(enum.StrEnum):
    ADMIN = "admin"
    BILLING = "billing"
    VIEWER = "viewer"
    DEVELOPER = "developer"
    GATEWAY = "gateway"


class ApiToken(msgspec.Struct, forbid_unknown_fields=True):
    """A token as kept (no raw secret: its hash, and the previous one's until its grace
    period ends)."""

    id: str
    tenant: str
    role: Role
    name: str
    secret_hash: str
    created_ms: int
    created_by: str
    consumers: list[str] = []  # developer: the consumers it may see
    expires_ms: int | None = None
    revoked_ms: int | None = None
    previous_hash: str | None = None
    previous_until_ms: int | None = None
    last_used_ms: int | None = None


class TokenView(msgspec.Struct):
    """What the API shows of a token (never a secret nor its hash)."""

    id: str
    tenant: str
    role: Role
    name: str
    consumers: list[str]
    created_at_ms: int
    created_by: str
    expires_at_ms: int | None
    revoked_at_ms: int | None
    last_used_at_ms: int | None
    previous_valid_until_ms: int | None


def view(token: ApiToken) -> TokenView:
    return TokenView(
        token.id,
        token.tenant,
        token.role,
        token.name,
        token.consumers,
        token.created_ms,
        token.created_by,
        token.expires_ms,
        token.revoked_ms,
        token.last_used_ms,
        token.previous_until_ms,
    )


class TokenRequest(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /v1/admin/tokens``."""

    role: str
    name: str
    tenant: str = "default"
    consumers: list[str] = []
    expires_in_seconds: int | None = None

    def validated(self) -> TokenRequest:
        check_id(self.tenant, TENANT_RE, "tenant")
        if self.role not in {r.value for r in Role}:
            raise InvalidInput(
                f"role {self.role[:40]!r} is not one of: {', '.join(r.value for r in Role)}",
                code="invalid_role",
                field="role",
            )
        if not self.name.strip() or len(self.name) > MAX_NAME or not self.name.isprintable():
            raise InvalidInput(f"name must be 1 to {MAX_NAME} printable characters", field="name")
        if self.role == Role.DEVELOPER:
            if not self.consumers:
                raise InvalidInput("a developer token names the consumers it may see", field="consumers")
            if len(self.consumers) > MAX_DEVELOPER_CONSUMERS:
                raise InvalidInput(f"at most {MAX_DEVELOPER_CONSUMERS} consumers", field="consumers")
            for consumer_id in self.consumers:
                check_id(consumer_id, CONSUMER_ID_RE, "consumers")
        elif self.consumers:
            raise InvalidInput("only a developer token names consumers", field="consumers")
        check_lifetime(self.expires_in_seconds)
        return self


class RotateRequest(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /v1/admin/tokens/{id}/rotate``: the old secret stays valid this long."""

    grace_seconds: int = 3600

    def validated(self) -> RotateRequest:
        if not 0 <= self.grace_seconds <= MAX_GRACE_SECONDS:
            raise InvalidInput(f"grace_seconds must be 0 to {MAX_GRACE_SECONDS}", field="grace_seconds")
        return self


def secret_hash(secret: str) -> str:
    # The secret is 256 random bits: a plain SHA-256 cannot be brute-forced, and a
    # salted slow hash would cost every admin call milliseconds for nothing.
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    return secrets.token_urlsafe(32)  # 43 characters


def new_token_id() -> str:
    return secrets.token_hex(8)


def raw_token(token_id: str, secret: str) -> str:
    return f"{TOKEN_PREFIX}{token_id}_{secret}"


def parse_raw(raw: str) -> tuple[str, str] | None:
    """(id, secret) of a raw token of ours, None for anything else."""
    match = _RAW_RE.fullmatch(raw)
    return None if match is None else (match.group(1), match.group(2))


def secret_matches(token: ApiToken, secret: str, now_ms: int) -> bool:
    """Whether ``secret`` is the token's (or, in the grace period, its previous one).
    Constant-time: both comparisons always run."""
    given = secret_hash(secret).encode()
    current = hmac.compare_digest(given, token.secret_hash.encode())
    previous = hmac.compare_digest(given, (token.previous_hash or "").encode())
    in_grace = token.previous_until_ms is not None and now_ms < token.previous_until_ms
    return current or (previous and in_grace)


def usable(token: ApiToken, now_ms: int) -> bool:
    return token.revoked_ms is None and (token.expires_ms is None or now_ms < token.expires_ms)


class Principal(msgspec.Struct, frozen=True):
    """Who is calling: a token, or the bootstrap admin (``tenant`` None: every tenant)."""

    actor: str  # for the audit log: "token:<id> <name>" or "admin-token"
    role: Role
    tenant: str | None
    consumers: frozenset[str] = frozenset()
    token_id: str | None = None

    def sees_tenant(self, tenant: str) -> bool:
        return self.tenant is None or self.tenant == tenant

    def sees_consumer(self, tenant: str, consumer_id: str) -> bool:
        if not self.sees_tenant(tenant):
            return False
        return self.role is not Role.DEVELOPER or consumer_id in self.consumers


BOOTSTRAP = Principal(actor="admin-token", role=Role.ADMIN, tenant=None)


def principal_of(token: ApiToken) -> Principal:
    return Principal(
        actor=f"token:{token.id} {token.name}",
        role=token.role,
        tenant=token.tenant,
        consumers=frozenset(token.consumers),
        token_id=token.id,
    )


# Who may call what, by the kind of work an endpoint does. Every endpoint names one of
# these (sidecar/http/access.py's table); the README's table is checked against it.
READ = frozenset({Role.ADMIN, Role.BILLING, Role.VIEWER})
READ_CONSUMERS = READ | {Role.DEVELOPER}
BILLING = frozenset({Role.ADMIN, Role.BILLING})
GATEWAY_OR_ADMIN = frozenset({Role.ADMIN, Role.GATEWAY})
ADMIN = frozenset({Role.ADMIN})
