"""The ``aforo-authorize`` plugin: one sidecar decision per request in the access phase,
one usage event per proxied request in the log phase.

Every PDK call is a round trip between the plugin server and Kong (a MessagePack-RPC
step over a unix socket), so the access phase makes only the calls its configuration
needs, in this order:

1. the identity: ``kong.client.get_consumer()`` (consumer_id, custom_id, username),
   ``kong.client.get_credential()`` (credential) or the API key header; the API key and
   the cost header are read with one ``kong.request.get_headers()`` when both are needed;
2. ``kong.router.get_service()``/``get_route()``, only when no ``product`` is configured;
3. then, after the sidecar call, either ``kong.response.exit(...)`` (denied: status, JSON
   body, Retry-After and X-RateLimit headers in the one call) or, when allowed, one
   ``kong.response.set_headers`` and, if enabled, one ``kong.service.request.set_headers``
   and (usage on, unless the upstream headers carry the decision id into the log and the
   identity is not an API key) one ``kong.ctx.shared.set``, read back in the log phase.

A PDK call comes first on purpose: kong-pdk's server holds a global lock from
``plugin.HandleEvent`` until the handler's first PDK call or return, so a sidecar call
made before it would serialise every request of the plugin server.

A handler must never raise: in kong-pdk's threading mode an exception ends the handler
thread without answering Kong, whose request then hangs. Every phase catches
everything, logs it and answers per the fail mode.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from decimal import Decimal
from typing import Any

import msgspec

from kong_plugin import usage
from kong_plugin.client import Ask, RequestRejected, SidecarUnavailable, Verdict, client_for
from kong_plugin.schema import MAX_MICROS, SECRET_HEADERS, Config

logger = logging.getLogger("aforo.kong")

CTX_KEY = "aforo"
_COST_RE = re.compile(r"[0-9]{1,16}")
DECISION_HEADER = "X-Aforo-Decision-Id"
CONSUMER_HEADER = "X-Aforo-Consumer-Id"
MAX_EVENT_HEADERS = 32
MAX_HEADER_VALUE = 2048
MAX_TEXT = 512
_MESSAGES = {
    "quota_exceeded": "API quota exceeded",
    "insufficient_balance": "Insufficient balance",
    "suspended": "Consumer suspended",
    "revoked": "Consumer revoked",
    "unknown_consumer": "Unknown consumer",
    "invalid_key": "Invalid API key",
    "key_expired": "API key expired",
    "scope_denied": "API key not allowed for this product",
    "product_not_allowed": "Product not included in the plan",
    "store_unavailable": "Quota service unavailable",
    "sidecar_unavailable": "Quota service unavailable",
    "missing_consumer": "No consumer identified",
    "invalid_cost": "Invalid cost header",
    "plugin_error": "Quota plugin error",
}
_LOG_EVERY_S = 10.0
_last_unavailable_log = 0.0


def _message(reason: str) -> str:
    return _MESSAGES.get(reason, "Request not allowed")


def _first(value: Any) -> str | None:
    """A header value as Kong hands it over: a string, or a list for repeated headers."""
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, str) else None


def _name_of(entity: Any) -> str | None:
    if not isinstance(entity, dict):
        return None
    value = entity.get("name") or entity.get("id")
    return value if isinstance(value, str) and value else None


def _balance_text(micros: int) -> str:
    """Micro-units as a plain decimal amount: 1250000 -> "1.25", 3000000 -> "3"."""
    value = (Decimal(micros) / 1_000_000).normalize()
    return format(value, "f")


def _int(value: Any) -> int:
    """A number from the serialized log (sizes may be strings, latencies floats)."""
    try:
        number = round(float(value))
    except (TypeError, ValueError, OverflowError):
        return 0
    return max(0, number)


class Plugin:
    """One instance per plugin configuration in Kong (``plugin.StartInstance``)."""

    def __init__(self, config: dict[str, Any]) -> None:
        # Raises ConfigError: kong-pdk answers StartInstance with its message.
        self.cfg = Config.parse(config)
        cfg = self.cfg
        address = cfg.address
        self.client = client_for(address)
        self.batcher = (
            usage.batcher_for(
                self.client,
                address,
                cfg.usage_queue_size,
                cfg.usage_batch_size,
                cfg.usage_flush_interval_ms / 1000,
            )
            if cfg.usage
            else None
        )
        self.timeout_s = cfg.timeout_ms / 1000
        self.headers_needed = tuple(
            name
            for name in (cfg.api_key_header if cfg.consumer_identity == "api_key" else None, cfg.cost_header)
            if name is not None
        )
        self.allowed_usage_headers = tuple(h for h in cfg.usage_headers if h not in SECRET_HEADERS)
        # Whether the access phase hands the decision to the log phase (kong.ctx.shared):
        # needed for an API key's consumer, and for the decision id unless the upstream
        # headers already carry it into the log. An event without a decision id is rated
        # by the sidecar (a call the fail mode let through), so it must not lack one.
        self._hands_over = cfg.consumer_identity == "api_key" or not cfg.upstream_headers

    # --- access ----------------------------------------------------------------------

    def access(self, kong: Any) -> None:
        try:
            self._access(kong)
        except Exception:
            # Never reached after kong.response.exit (always the handler's last call).
            logger.exception("aforo-authorize access phase failed")
            if not self.cfg.fail_open:
                self._deny(kong, 500, "plugin_error", {})

    def _read_headers(self, kong: Any) -> dict[str, str | None]:
        names = self.headers_needed
        if not names:
            return {}
        if len(names) == 1:
            return {names[0]: _first(kong.request.get_header(names[0]))}
        # Several headers: one round trip for all of them beats one each.
        headers = kong.request.get_headers() or {}
        return {name: _first(headers.get(name)) for name in names}

    def _access(self, kong: Any) -> None:
        cfg = self.cfg
        headers = self._read_headers(kong)
        consumer_id: str | None = None
        api_key: str | None = None
        identity = cfg.consumer_identity
        if identity == "api_key":
            api_key = headers.get(cfg.api_key_header)
        elif identity == "credential":
            credential = kong.client.get_credential()
            consumer_id = credential.get("id") if isinstance(credential, dict) else None
        else:
            consumer = kong.client.get_consumer()
            if isinstance(consumer, dict):
                field = "id" if identity == "consumer_id" else identity
                consumer_id = consumer.get(field)
        if not isinstance(consumer_id, str):
            consumer_id = None  # absent, or null (cjson.null) for an unset custom_id
        if not consumer_id and not api_key:
            self._deny(kong, 401, "missing_consumer", {})
            return
        product = cfg.product
        if product is None:
            entity = kong.router.get_service() if cfg.product_from == "service" else kong.router.get_route()
            product = _name_of(entity)
            if product is None:
                raise RuntimeError(f"no {cfg.product_from} to name the product after; set config.product")
        cost = cfg.cost
        if cfg.cost_header is not None:
            raw = headers.get(cfg.cost_header)
            if raw is not None:
                # Plain digits only (int() would also take "+5", "1_000" and " 5 ").
                if not _COST_RE.fullmatch(raw) or int(raw) > MAX_MICROS:
                    self._deny(kong, 400, "invalid_cost", {})
                    return
                cost = int(raw)
        ask = Ask(
            tenant=cfg.tenant,
            product=product,
            consumer_id=consumer_id or None,
            api_key=api_key if not consumer_id else None,
            cost=cost,
            hits=cfg.hits,
        )
        try:
            verdict = self.client.authorize(ask, self.timeout_s)
        except SidecarUnavailable as exc:
            self._unavailable(kong, exc)
            return
        except RequestRejected as exc:
            # A malformed key is as unknown as a wrong one: answer like the sidecar would.
            status = 401 if exc.code in ("invalid_key", "missing_consumer") else 400
            self._deny(kong, status, exc.code, {})
            return
        headers_out = self._client_headers(verdict)
        if not verdict.allow:
            self._deny(kong, verdict.status, verdict.reason, headers_out, verdict)
            return
        if headers_out:
            kong.response.set_headers(headers_out)
        resolved = verdict.consumer_id or consumer_id or ""
        if cfg.upstream_headers:
            kong.service.request.set_headers(
                {DECISION_HEADER: verdict.decision_id, CONSUMER_HEADER: resolved}
            )
        if self.batcher is not None and self._hands_over:
            # Hand the decision to the log phase: its usage event names the decision, so
            # the sidecar knows the call is charged already and does not rate it again;
            # and the log phase cannot see who an API key belongs to.
            kong.ctx.shared.set(CTX_KEY, {"consumer_id": resolved, "decision_id": verdict.decision_id})

    def _client_headers(self, verdict: Verdict) -> dict[str, str]:
        headers: dict[str, str] = {}
        if self.cfg.rate_limit_headers and verdict.windows:
            now = int(time.time())
            for window in verdict.windows:
                suffix = window.window.capitalize()
                headers[f"X-RateLimit-Limit-{suffix}"] = str(window.limit)
                headers[f"X-RateLimit-Remaining-{suffix}"] = str(window.remaining)
                headers[f"X-RateLimit-Reset-{suffix}"] = str(max(0, window.reset - now))
        if self.cfg.balance_header and verdict.balance is not None:
            headers["X-Aforo-Balance"] = _balance_text(verdict.balance)
        return headers

    def _deny(
        self,
        kong: Any,
        status: int,
        reason: str,
        headers: dict[str, str],
        verdict: Verdict | None = None,
    ) -> None:
        """End the request: the terminal PDK call, so always the handler's last."""
        body: dict[str, Any] = {"message": _message(reason), "reason": reason}
        if verdict is not None:
            body["decision_id"] = verdict.decision_id
            if verdict.retry_after is not None:
                body["retry_after"] = verdict.retry_after
                headers["Retry-After"] = str(verdict.retry_after)
        elif status == 503:
            headers["Retry-After"] = "1"
        kong.response.exit(status, body, headers)

    def _unavailable(self, kong: Any, exc: Exception) -> None:
        global _last_unavailable_log
        now = time.monotonic()
        if now - _last_unavailable_log >= _LOG_EVERY_S:
            _last_unavailable_log = now
            logger.warning("sidecar unavailable (%s); failing %s", exc, self.cfg.fail_mode)
        if not self.cfg.fail_open:
            self._deny(kong, 503, "sidecar_unavailable", {})

    # --- log -------------------------------------------------------------------------

    def log(self, kong: Any) -> None:
        if self.batcher is None:
            return
        try:
            self._log(kong)
        except Exception:
            logger.exception("aforo-authorize log phase failed")

    def _log(self, kong: Any) -> None:
        assert self.batcher is not None
        raw = kong.log.serialize()
        data = msgspec.json.decode(raw) if isinstance(raw, str | bytes) else raw
        if not isinstance(data, dict):
            raise TypeError(f"kong.log.serialize() gave {type(data).__name__}")
        if data.get("source") == "exit":
            # Answered by a plugin (ours denying, or another), not proxied: no usage.
            return
        shared = kong.ctx.shared.get(CTX_KEY) if self._hands_over else None
        event = self.event(data, shared if isinstance(shared, dict) else None)
        if event is None:
            logger.debug("proxied request without an identifiable consumer: no usage event")
            return
        self.batcher.offer(event)

    def event(self, data: dict[str, Any], shared: dict[str, Any] | None) -> dict[str, Any] | None:
        """The usage event of one serialized Kong log entry (None: no consumer known)."""
        cfg = self.cfg
        request = data.get("request") or {}
        response = data.get("response") or {}
        latencies = data.get("latencies") or {}
        request_headers = request.get("headers") or {}
        identity = cfg.consumer_identity
        consumer_id: Any = None
        decision_id: Any = None
        if shared is not None:
            # Set by the access phase when the sidecar allowed the call (none when it was
            # let through by the fail mode: the sidecar then rates the event).
            consumer_id = shared.get("consumer_id")
            decision_id = shared.get("decision_id")
        elif identity == "credential":
            consumer_id = (data.get("authenticated_entity") or {}).get("id")
        elif identity != "api_key":
            consumer = data.get("consumer") or {}
            consumer_id = consumer.get("id" if identity == "consumer_id" else identity)
        if not isinstance(consumer_id, str) or not consumer_id:
            return None
        if decision_id is None and cfg.upstream_headers:
            # The access phase added it to the upstream request, which the log shows.
            decision_id = _first(request_headers.get(DECISION_HEADER.lower()))
        route, service = data.get("route"), data.get("service")
        product = cfg.product or _name_of(service if cfg.product_from == "service" else route) or ""
        request_id = request.get("id")
        if not isinstance(request_id, str) or not request_id:
            # Kong before 3.5 has no request id in the log: one of ours, fixed for the
            # event's life so a resent batch is still deduplicated.
            request_id = uuid.uuid4().hex
        headers: dict[str, str] = {}
        for name in self.allowed_usage_headers:
            value = request_headers.get(name)
            if isinstance(value, list):
                value = ", ".join(v for v in value if isinstance(v, str))
            if isinstance(value, str):
                headers[name] = value[:MAX_HEADER_VALUE]
                if len(headers) >= MAX_EVENT_HEADERS:
                    break
        upstream_latency = latencies.get("proxy")
        return {
            "tenant": cfg.tenant,
            "consumer_id": consumer_id,
            "request_id": request_id,
            "product": product[:MAX_TEXT],
            "route": (_name_of(route) or "")[:MAX_TEXT],
            "service": (_name_of(service) or "")[:MAX_TEXT],
            "method": str(request.get("method") or "")[:MAX_TEXT],
            "status": _int(response.get("status")),
            "started_at_ms": _int(data.get("started_at")),
            "latency_ms": _int(latencies.get("request")),
            # -1 means no upstream was reached.
            "upstream_latency_ms": _int(upstream_latency) if upstream_latency != -1 else 0,
            "gateway_latency_ms": _int(latencies.get("kong")),
            "request_size": _int(request.get("size")),
            "response_size": _int(response.get("size")),
            "decision_id": decision_id if isinstance(decision_id, str) else "",
            "headers": headers,
        }
