"""API keys: generated once, shown once, stored only as SHA-256 hashes, optionally
limited in time and to scopes.

A scope is a product id (every operation of that product) or ``product:operation``
(that operation only, compared whole). A key without scopes may call every product its
consumer's plan allows; a key with scopes only those it names, and a call outside them
is refused ``scope_denied`` before anything is counted. The plan's own product list
still applies on top: a scope never widens what the plan sells.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence

from sidecar.core.errors import InvalidInput, shown
from sidecar.core.models import PRODUCT_RE, ConsumerKey
from sidecar.core.reasons import Reason

KEY_PREFIX = "ak_"
MAX_SCOPES = 100
MAX_SCOPE_LEN = 713  # a product (200) + ':' + an operation (512)
# Where keys are stored as one string the scopes are joined by '|' (decide.lua matches
# '|scope|'), which no product holds and a scope may not hold.
SCOPE_SEPARATOR = "|"


def generate_api_key() -> str:
    """A new raw key: 256 bits of randomness, URL-safe, recognisable by its prefix."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(raw: str) -> str:
    """The only form in which a key is stored or logged: lowercase SHA-256 hex."""
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


def checked_scopes(scopes: Sequence[str], field: str = "scopes") -> tuple[str, ...]:
    """The scopes as stored: validated, duplicates dropped, sorted."""
    if len(scopes) > MAX_SCOPES:
        raise InvalidInput(f"at most {MAX_SCOPES} scopes", field=field)
    for scope in scopes:
        # A product may hold ':' itself: only the part before the first ':' must be a
        # product id's characters, whatever follows is an operation.
        product = scope.partition(":")[0]
        if (
            not scope
            or len(scope) > MAX_SCOPE_LEN
            or SCOPE_SEPARATOR in scope
            or not PRODUCT_RE.fullmatch(product)
            or any(ch in scope for ch in "\r\n\0")
        ):
            raise InvalidInput(
                f"scope {shown(scope)} is not a product id or product:operation "
                f"(at most {MAX_SCOPE_LEN} characters, no '|')",
                code="invalid_scope",
                field=field,
            )
    return tuple(sorted(set(scopes)))


def in_scope(scopes: Sequence[str], product: str, operation: str) -> bool:
    """Whether a key limited to ``scopes`` may call ``product`` / ``operation``.

    A product id may itself hold ':' (``urn:weather``), so a scope is compared whole
    against the product and against ``product:operation``, never split."""
    if not scopes:
        return True
    return product in scopes or (operation != "" and f"{product}:{operation}" in scopes)


def key_refusal(key: ConsumerKey, product: str, operation: str, now_ms: int) -> Reason | None:
    """Why this registered key may not make this call now (None: it may)."""
    if key.expires_ms is not None and now_ms >= key.expires_ms:
        return Reason.KEY_EXPIRED
    if not in_scope(key.scopes, product, operation):
        return Reason.SCOPE_DENIED
    return None
