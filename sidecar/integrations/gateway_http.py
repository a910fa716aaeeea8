"""HTTP to a gateway's management API (Kong Admin API, Konnect, Apigee Management API):
JSON GETs and writes, retried on 429 and 5xx with backoff that honours Retry-After,
every failure turned into a GatewayError with a stable code."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import httpx
import msgspec

from sidecar.core.digits import digits

log = logging.getLogger("aforo.gateway")
RETRYABLE = frozenset({429, 500, 502, 503, 504})
MAX_WAIT_S = 30.0  # a Retry-After beyond this is capped: a sync must end


class GatewayError(Exception):
    """A gateway call failed. ``code``: unauthorized (401, 403), not_found (404),
    timeout, unreachable (connection refused or reset, DNS), rate_limited (429 after
    every attempt), gateway_error (5xx after every attempt, or another status),
    bad_response (not the JSON expected)."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


def retry_after_seconds(value: str | None, default: float, cap: float = MAX_WAIT_S) -> float:
    """A Retry-After header's delay in seconds (its HTTP-date form is not used by the
    gateways here: ``default`` then), capped at ``cap``."""
    text = (value or "").strip()
    seconds = float(text) if digits(text.replace(".", "", 1)) else default
    return min(seconds, cap)


class GatewayHttp:
    """One gateway's base URL and credentials, over one httpx.AsyncClient."""

    def __init__(
        self,
        base_url: str,
        headers: Mapping[str, str],
        *,
        timeout_s: float = 5.0,
        attempts: int = 4,
        first_delay_s: float = 0.2,
    ) -> None:
        self._client = httpx.AsyncClient(base_url=base_url, headers=dict(headers), timeout=timeout_s)
        self._attempts = attempts
        self._first_delay_s = first_delay_s

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """The decoded JSON answer (None for an empty body); GatewayError otherwise."""
        delay = self._first_delay_s
        for attempt in range(1, self._attempts + 1):
            try:
                response = await self._client.request(method, path, params=params, json=json, headers=headers)
            except httpx.TimeoutException as exc:
                raise GatewayError("timeout", f"{method} {path}: no answer in time ({exc!r})") from None
            except httpx.TransportError as exc:
                raise GatewayError("unreachable", f"{method} {path}: {exc!r}") from None
            status = response.status_code
            if status in RETRYABLE and attempt < self._attempts:
                wait = retry_after_seconds(response.headers.get("retry-after"), delay)
                log.warning("%s %s answered %d; retrying in %.1fs", method, path, status, wait)
                await asyncio.sleep(wait)
                delay = min(delay * 2, MAX_WAIT_S)
                continue
            if status in (401, 403):
                raise GatewayError("unauthorized", f"{method} {path}: {status}", status)
            if status == 404:
                raise GatewayError("not_found", f"{method} {path}: 404", status)
            if status == 429:
                raise GatewayError("rate_limited", f"{method} {path}: 429 after {attempt} attempts", status)
            if not 200 <= status < 300:
                raise GatewayError("gateway_error", f"{method} {path}: {status}", status)
            if not response.content:
                return None
            try:
                return msgspec.json.decode(response.content)
            except msgspec.DecodeError:
                raise GatewayError(
                    "bad_response", f"{method} {path}: the answer is not JSON", status
                ) from None
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        await self._client.aclose()
