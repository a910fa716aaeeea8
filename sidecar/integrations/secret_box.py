"""Secrets at rest (gateway tokens, passwords): AES-256-GCM with keys from the settings.

A sealed secret is ``v1.<key id>.<base64url(nonce || ciphertext || tag)>``; the
associated data binds it to the row it belongs to, so a ciphertext copied onto another
connection does not open. The first key of the ring seals; every key opens, so keys
rotate by putting a new one first and re-sealing (a write of the connection re-seals).
"""

from __future__ import annotations

import base64
import binascii
import os
import re

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

VERSION = "v1"
KEY_BYTES = 32
NONCE_BYTES = 12
KEY_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")


class SecretBoxError(Exception):
    """A key ring that cannot be used, or a sealed secret that does not open."""


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def parse_key(text: str) -> bytes:
    """A key as settings give it: 32 bytes, base64 (standard or URL-safe)."""
    try:
        raw = _b64decode(text.replace("+", "-").replace("/", "_").rstrip("="))
    except (binascii.Error, ValueError):
        raise SecretBoxError("a secret key must be base64") from None
    if len(raw) != KEY_BYTES:
        raise SecretBoxError(f"a secret key must be {KEY_BYTES} bytes (base64 of {KEY_BYTES} random bytes)")
    return raw


def new_key() -> str:
    """A fresh key, in the form settings take."""
    return base64.urlsafe_b64encode(os.urandom(KEY_BYTES)).decode().rstrip("=")


class SecretBox:
    def __init__(self, keys: dict[str, str]) -> None:
        """``keys``: key id -> base64 key, the first one sealing."""
        if not keys:
            raise SecretBoxError("no secret keys configured")
        for key_id in keys:
            if not KEY_ID_RE.fullmatch(key_id):
                raise SecretBoxError(f"secret key id {key_id!r} is not valid ({KEY_ID_RE.pattern})")
        self._keys = {key_id: AESGCM(parse_key(text)) for key_id, text in keys.items()}
        self.current = next(iter(keys))

    def seal(self, plaintext: str, context: str) -> str:
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._keys[self.current].encrypt(nonce, plaintext.encode(), context.encode())
        token = base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")
        return f"{VERSION}.{self.current}.{token}"

    def open(self, sealed: str, context: str) -> str:
        try:
            version, key_id, token = sealed.split(".", 2)
        except ValueError:
            raise SecretBoxError("not a sealed secret") from None
        if version != VERSION:
            raise SecretBoxError(f"unknown sealed secret version {version!r}")
        key = self._keys.get(key_id)
        if key is None:
            raise SecretBoxError(f"sealed with key {key_id!r}, which is not configured")
        raw = _b64decode(token)
        try:
            return key.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], context.encode()).decode()
        except InvalidTag:
            raise SecretBoxError("the sealed secret does not open (wrong key or row)") from None

    def key_id(self, sealed: str) -> str:
        return sealed.split(".", 2)[1]
