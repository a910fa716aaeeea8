"""Webhooks: endpoints, the signature and the retry schedule (no I/O).

Signatures follow the Standard Webhooks specification
(https://github.com/standard-webhooks/standard-webhooks/blob/main/spec/standard-webhooks.md),
so receivers can verify with its libraries:

- the secret is ``whsec_`` + base64 of 32 random bytes; the HMAC key is those bytes;
- the signed content is ``<webhook-id>.<webhook-timestamp>.<body>``, the timestamp in
  integer seconds since the epoch;
- ``webhook-signature`` is ``v1,`` + base64(HMAC-SHA256(key, content)).

A retry of a message keeps its ``webhook-id`` (receivers deduplicate on it) and is
signed again with the timestamp of the attempt.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import os
import random
import re
from urllib.parse import urlsplit

import msgspec

from sidecar.core.alerts import AlertType
from sidecar.core.errors import InvalidInput
from sidecar.core.models import TENANT_RE, check_id

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32
WEBHOOK_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_URL = 2048
MAX_EVENT_TYPES = len(AlertType)
LOOPBACK_NAMES = {"localhost"}


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(os.urandom(SECRET_BYTES)).decode()


def sign(secret: str, message_id: str, timestamp_s: int, body: bytes) -> str:
    """The ``webhook-signature`` header's value for one attempt."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    content = f"{message_id}.{timestamp_s}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()


def _loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class WebhookSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A webhook endpoint as PUT /v1/admin/webhooks/{id} takes it."""

    url: str
    events: list[str]  # AlertType values
    tenant: str = "default"
    enabled: bool = True  # a disabled endpoint keeps its deliveries waiting, in order
    description: str = ""

    def validated(self) -> WebhookSpec:
        check_id(self.tenant, TENANT_RE, "tenant")
        if len(self.url) > MAX_URL or any(ord(ch) < 33 for ch in self.url):
            raise InvalidInput(f"url must be at most {MAX_URL} characters, without spaces", field="url")
        try:
            parts = urlsplit(self.url)
            host, _ = parts.hostname, parts.port
        except ValueError:
            raise InvalidInput("url is not a valid URL", field="url") from None
        if parts.scheme not in ("https", "http") or not host:
            raise InvalidInput("url must be an absolute https:// URL", field="url")
        # Plain http only to this machine: events carry billing data and are signed,
        # not encrypted.
        if parts.scheme == "http" and not _loopback(host):
            raise InvalidInput("url must use https (http only for loopback receivers)", field="url")
        if parts.username is not None or parts.password is not None:
            raise InvalidInput("url may not hold credentials: receivers verify the signature", field="url")
        known = {t.value for t in AlertType}
        if not self.events or len(self.events) > MAX_EVENT_TYPES:
            raise InvalidInput(f"events must list 1 to {MAX_EVENT_TYPES} event types", field="events")
        for event in self.events:
            if event not in known:
                raise InvalidInput(
                    f"unknown event type {event[:64]!r}; known: {', '.join(sorted(known))}", field="events"
                )
        if len(self.description) > 512 or "\x00" in self.description:
            raise InvalidInput("description must be at most 512 characters, without NUL", field="description")
        self.events = sorted(set(self.events))
        return self


class RetryPolicy(msgspec.Struct, frozen=True):
    """Exponential backoff with jitter, for at least ``period_s`` after the message was
    created: the delay after the n-th failed attempt is first_s * 2^(n-1), capped at
    max_s, each drawn between half and all of it; the last attempt is at the period's
    end, after which the delivery is given up (and can be redelivered by hand)."""

    first_s: float = 5.0
    max_s: float = 3600.0
    period_s: float = 86_400.0

    def next_attempt(self, attempts: int, created_s: float, now_s: float, rng: random.Random) -> float | None:
        """When to try again after ``attempts`` failed attempts (None: give up)."""
        deadline = created_s + self.period_s
        if now_s >= deadline:
            return None
        delay = min(self.max_s, self.first_s * 2 ** min(attempts - 1, 62))
        return min(now_s + delay * rng.uniform(0.5, 1.0), deadline)
