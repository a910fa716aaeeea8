"""The gateway token a gateway-facing call carries, when the sidecar requires one
(``require_gateway_token``): decisions on the HTTP port, the decision port and gRPC,
usage reports and the other gRPC calls.

Accepted: an API token of the call's tenant with the ``gateway`` or ``admin`` role, or
the bootstrap admin token. Checked without a round trip on the hot path: a token's
record is kept in this process for ``CACHE_S`` after it was read (an unknown id for
``UNKNOWN_CACHE_S``), so a revocation or rotation made in another process takes effect
here within ``CACHE_S`` (at once in the process that made it). Only a cache miss awaits
the token store. Transport-free: each transport reads the header or metadata itself.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable

from cachetools import TTLCache

from sidecar.core.access import TOKEN_PREFIX, ApiToken, Role, parse_raw, secret_matches, usable
from sidecar.core.clock import now_ms

CACHE_S = 5.0
UNKNOWN_CACHE_S = 1.0
_ROLES = (Role.GATEWAY, Role.ADMIN)
Lookup = Callable[[str], Awaitable[ApiToken | None]]
_Held = tuple[float, ApiToken | None]  # until when (monotonic) a record read is trusted, the record

MISSING = "gateway_token_required"
INVALID = "unauthorized"
# What every transport says with each refusal (its error code, or gRPC UNAUTHENTICATED).
REFUSALS = {MISSING: "this call needs a gateway token", INVALID: "invalid, expired or revoked gateway token"}


class GatewayTokens:
    def __init__(self, required: bool, admin_token: str | None, lookup: Lookup) -> None:
        self.required = required
        self._admin = None if admin_token is None else admin_token.encode()
        self._lookup = lookup
        self._known: dict[str, _Held] = {}
        self._unknown: TTLCache[str, bool] = TTLCache(maxsize=100_000, ttl=UNKNOWN_CACHE_S)
        # (header, tenant) -> until when (monotonic) it was found good: a gateway sends
        # the same header on every call, so most checks are this one lookup (no regex,
        # no hash). Never past the token's record's cache time, expiry or grace period.
        self._accepted: dict[tuple[str, str | None], float] = {}

    def check_now(self, header: str | None, tenant: str | None) -> str | bool | None:
        """Without awaiting: None when the call may go on, MISSING or INVALID (the error
        code) when it may not, False when the token must be looked up first (``check``).
        ``tenant`` None: a gateway token of any tenant (before the call names one)."""
        if not self.required:
            return None
        if not header:
            return MISSING
        until = self._accepted.get((header, tenant))
        if until is not None and time.monotonic() < until:
            return None
        scheme, _, given = header.partition(" ")
        given = given.strip()
        if scheme.lower() != "bearer" or not given:
            return MISSING
        if not given.startswith(TOKEN_PREFIX):
            ok = self._admin is not None and hmac.compare_digest(given.encode(), self._admin)
            return None if ok else INVALID  # cheap enough: not remembered
        parsed = parse_raw(given)
        if parsed is None:
            return INVALID
        token_id, secret = parsed
        held = self._known.get(token_id)
        if held is None or time.monotonic() >= held[0]:
            return INVALID if token_id in self._unknown else False
        return self._accept(header, tenant, held, secret)

    async def check(self, header: str | None, tenant: str | None) -> str | None:
        """As ``check_now``, looking the token up when this process does not hold it."""
        verdict = self.check_now(header, tenant)
        if verdict is not False:
            return verdict  # type: ignore[return-value]
        token_id, secret = parse_raw(header.partition(" ")[2].strip())  # type: ignore[misc, union-attr]
        token = await self._lookup(token_id)
        if token is None:
            self._unknown[token_id] = True
            return INVALID
        if len(self._known) >= 100_000:
            self._known.clear()
        held = self._known[token_id] = (time.monotonic() + CACHE_S, token)
        return self._accept(header, tenant, held, secret)  # type: ignore[arg-type]

    def _accept(
        self, header: str, tenant: str | None, held: tuple[float, ApiToken | None], secret: str
    ) -> str | None:
        verdict = self._verdict(held[1], secret, tenant)
        token = held[1]
        if verdict is None and token is not None:
            # Good until the record is read again, the token expires or (for the
            # previous secret) its grace period ends, whichever comes first.
            ends = [held[0]]
            now = now_ms()
            for end_ms in (token.expires_ms, token.previous_until_ms):
                if end_ms is not None:
                    ends.append(time.monotonic() + (end_ms - now) / 1000)
            if len(self._accepted) >= 10_000:
                self._accepted.clear()
            self._accepted[(header, tenant)] = min(ends)
        return verdict

    def forget(self, token_id: str) -> None:
        """A token changed in this process (revoked, rotated): read it again."""
        self._known.pop(token_id, None)
        self._unknown.pop(token_id, None)
        self._accepted.clear()  # which headers named it is not kept: start over (rare)

    @staticmethod
    def _verdict(token: ApiToken | None, secret: str, tenant: str | None) -> str | None:
        now = now_ms()
        if token is None or not secret_matches(token, secret, now) or not usable(token, now):
            return INVALID
        if token.role not in _ROLES or (tenant is not None and token.tenant != tenant):
            return INVALID
        return None
