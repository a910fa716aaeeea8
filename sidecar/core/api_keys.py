"""API keys: generated once, shown once, stored only as SHA-256 hashes."""

from __future__ import annotations

import hashlib
import secrets

KEY_PREFIX = "ak_"


def generate_api_key() -> str:
    """A new raw key: 256 bits of randomness, URL-safe, recognisable by its prefix."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(raw: str) -> str:
    """The only form in which a key is stored or logged: lowercase SHA-256 hex."""
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()
