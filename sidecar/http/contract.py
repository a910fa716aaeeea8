"""What each endpoint takes and answers, for the OpenAPI document (sidecar/http/openapi.py).

One row per route, like ``ACCESS``: the summary, the msgspec Struct the handler decodes
its body into, its query parameters, its success answers (the Struct it encodes, where it
encodes one) and the error statuses it can answer beyond those every route of its kind
can (``Operation.implied_errors``). The schemas themselves come from the Structs; the
test suite runs schemathesis against a live sidecar with this document, so a row that
disagrees with its handler fails CI.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from sidecar.core.access import TOKEN_ID_RE, RotateRequest, TokenRequest, TokenView
from sidecar.core.alerts import AlertRules, AlertType
from sidecar.core.current_usage import CurrentUsage
from sidecar.core.models import (
    CONSUMER_ID_CHARS,
    PLAN_ID_RE,
    TENANT_RE,
    AuthorizeRequest,
    ConsumerSpec,
    ConsumerView,
    Decision,
    Plan,
)
from sidecar.core.usage_summary import GRANULARITIES
from sidecar.core.webhooks import WEBHOOK_ID_RE, WebhookSpec
from sidecar.http.access import GATEWAY, INGEST_SECRET, OPEN, Rule
from sidecar.http.admin import KeyRequest, StatusChange, TopUp
from sidecar.http.alerts import DELIVERY_STATUSES
from sidecar.http.connections import ApplyRequest, Health
from sidecar.http.decisions import ApigeeAuthorize, ApigeeDecision
from sidecar.http.introspection import Inactive, Introspection, IntrospectRequest
from sidecar.http.reconciliation import SOURCES
from sidecar.http.usage import UsageAnswer
from sidecar.http.usage_query import UsageSummary
from sidecar.integrations.apigee.analytics import Analytics
from sidecar.integrations.apigee.routes import AppStatusChange, CatalogSync, EnforceQuota
from sidecar.integrations.catalog_import import ImportResult
from sidecar.integrations.connections import CONNECTION_ID_RE, ConnectionSpec, ConnectionView
from sidecar.integrations.kong.log_entries import KongLog
from sidecar.integrations.kong.routes import EnforceGroup
from sidecar.reconciler.gateway_drift import DriftRun
from sidecar.reconciler.webhook_store import WebhookView


class Param(NamedTuple):
    name: str
    description: str
    type: str = "string"
    required: bool = False
    pattern: str | None = None
    minimum: int | None = None
    maximum: int | None = None
    enum: tuple[str, ...] = ()


class Answer(NamedTuple):
    """A success answer: its body's type (None: a JSON object described in words)."""

    schema: Any = None
    description: str = ""
    media_type: str | None = "application/json"
    also: tuple[str, ...] = ()  # other media types it may come as (a string each: CSV)


class Operation(NamedTuple):
    summary: str
    tag: str
    ok: dict[int, Answer]
    body: Any = None  # the type the handler decodes the body into
    body_required: bool = True
    query: tuple[Param, ...] = ()
    errors: frozenset[int] = frozenset()
    # Fields of the body the handler takes from the path (a body may repeat them, with
    # the same value): not required in the body's schema.
    from_path: tuple[str, ...] = ()

    def implied_errors(self, rule: Rule, has_path: bool, has_query: bool) -> set[int]:
        """What every route of this kind can answer: a bad body or parameter (400), a
        body over the limit (413), an unknown object (404), the credentials (401, 403,
        429 for an address past its failed attempts) and a store that does not answer."""
        errors: set[int] = set()
        if self.body is not None:
            errors |= {400, 413}
        if has_query:
            errors.add(400)
        if has_path:
            errors |= {400, 404}
        if rule == INGEST_SECRET:
            errors.add(401)
        elif rule == GATEWAY:
            errors |= {401, 403}
        elif rule != OPEN:
            errors |= {401, 403, 429}
        if rule != OPEN:
            errors.add(503)
        return errors


PATH_PARAMS = {
    "plan_id": Param("plan_id", "The plan's id.", pattern=PLAN_ID_RE.pattern),
    "consumer_id": Param("consumer_id", "The consumer's id.", pattern=CONSUMER_ID_CHARS),
    "key_hash": Param("key_hash", "The key's SHA-256, 64 hex digits.", pattern="[0-9a-fA-F]{64}"),
    "token_id": Param("token_id", "The token's id (16 hex digits).", pattern=TOKEN_ID_RE.pattern),
    "connection_id": Param("connection_id", "The connection's id.", pattern=CONNECTION_ID_RE.pattern),
    "webhook_id": Param("webhook_id", "The webhook endpoint's id.", pattern=WEBHOOK_ID_RE.pattern),
    "delivery_id": Param("delivery_id", "The delivery's id (digits).", pattern="[0-9]{1,19}"),
}

TENANT = Param("tenant", "The tenant (default: default).", pattern=TENANT_RE.pattern)
CONNECTION = Param("connection_id", "The connection (default: konnect).", pattern=CONNECTION_ID_RE.pattern)
PAGE = (
    Param("limit", "Page size, 1 to 1000 (default 100).", type="integer", minimum=1, maximum=1000),
    Param("cursor", "The previous page's next_cursor."),
)
GATEWAY_ERRORS = frozenset({409, 501, 502})  # a preview token spent, no Postgres, the gateway failed
POSTGRES = frozenset({501})

DECISION_STATUSES = {
    200: Answer(Decision, "Allowed (also a fail-open answer, degraded: true)."),
    401: Answer(Decision, "invalid_key, key_expired."),
    402: Answer(Decision, "insufficient_balance."),
    403: Answer(Decision, "suspended, revoked, unknown_consumer, product_not_allowed, scope_denied."),
    429: Answer(Decision, "quota_exceeded (Retry-After until the windows reset)."),
    503: Answer(Decision, "store_unavailable with the fail mode closed."),
}
APIGEE_STATUSES = {status: Answer(ApigeeDecision, a.description) for status, a in DECISION_STATUSES.items()}
DELETED = Answer(description='{"deleted": true, "tenant", "id"}.')
CONSUMER = {200: Answer(ConsumerView, "The consumer after the change.")}
REVOKED = frozenset({409})  # consumer_revoked: a revocation is final
NO_CONSUMER = REVOKED | {404}  # a seed contract names the consumer in its body
INTROSPECTION = {
    200: Answer((Introspection, Inactive), 'A live key\'s context, else exactly {"active": false}.')
}
CREATED_OR_REPLACED = "201 when created, 200 when replaced."
IMPORT = {200: Answer(ImportResult, "The diff (preview) or what was applied.")}
TEST = {200: Answer(description='{"ok": true, "counts"}; when the gateway fails {"ok": false, ...}.')}

CONNECTION_SAVED = {
    201: Answer(ConnectionView, CREATED_OR_REPLACED),
    200: Answer(ConnectionView, CREATED_OR_REPLACED),
}


def _health(gateway: str, tag: str) -> Operation:
    return Operation(
        f"The tenant's {gateway} connections, the reconciler, the backlog.",
        tag,
        {200: Answer(Health)},
        query=(TENANT,),
        errors=frozenset({404}) | POSTGRES,
    )


def _seed_connection(gateway: str, tag: str) -> Operation:
    return Operation(
        f"Create or replace a {gateway} connection (seed contract).",
        tag,
        CONNECTION_SAVED,
        body=ConnectionSpec,
        errors=frozenset({404}) | POSTGRES,
    )


def _status_change(summary: str, errors: frozenset[int]) -> Operation:
    return Operation(
        summary,
        "consumers",
        CONSUMER,
        body=StatusChange,
        body_required=False,
        errors=errors,
        from_path=("consumer_id",),
    )


def _seed_status(verb: str, tag: str, body: Any) -> Operation:
    """The seeds' suspend / resume contracts: the consumer is named in the body."""
    return Operation(f"{verb} a consumer (seed contract).", tag, CONSUMER, body=body, errors=NO_CONSUMER)


OPERATIONS: dict[tuple[str, str], Operation] = {
    # --- decisions and usage -----------------------------------------------------------
    ("POST", "/v1/authorize"): Operation(
        "Decide whether a consumer (by id or raw API key) may call a product now; an allowed "
        "call is counted and charged.",
        "decisions",
        DECISION_STATUSES,
        body=AuthorizeRequest,
    ),
    ("POST", "/integrations/apigee/authorize"): Operation(
        "The Apigee shared flow's decision: the same decision, Apigee-shaped.",
        "decisions",
        APIGEE_STATUSES,
        body=ApigeeAuthorize,
    ),
    ("POST", "/v1/usage"): Operation(
        "Record gateway usage events (one or a batch), each once per request id.",
        "decisions",
        {200: Answer(UsageAnswer, "What was stored, what was a duplicate, what was refused and why.")},
        body=dict[str, Any] | list[dict[str, Any]],
    ),
    ("POST", "/internal/api-keys/introspect"): Operation(
        "What a raw API key stands for (RFC 7662 style), counting nothing.",
        "decisions",
        INTROSPECTION,
        body=IntrospectRequest,
        errors=frozenset({404, 429}),
    ),
    ("POST", "/v1/api-keys/introspect"): Operation(
        "What a raw API key stands for (RFC 7662 style), counting nothing.",
        "decisions",
        INTROSPECTION,
        body=IntrospectRequest,
        errors=frozenset({404, 429}),
    ),
    # --- probes and the contract ---------------------------------------------------------
    ("GET", "/healthz"): Operation(
        "Liveness: the process serves.", "probes", {200: Answer(description='{"status": "ok"}.')}
    ),
    ("GET", "/readyz"): Operation(
        "Readiness: the store answers.",
        "probes",
        {200: Answer(description='{"status": "ready"}.')},
        errors=frozenset({503}),
    ),
    ("GET", "/metrics"): Operation(
        "Prometheus metrics.",
        "probes",
        {200: Answer(description="Prometheus text exposition format.", media_type="text/plain")},
    ),
    ("GET", "/openapi.json"): Operation(
        "This document.", "probes", {200: Answer(description="OpenAPI 3.1.")}
    ),
    ("GET", "/docs"): Operation(
        "This document, rendered (works offline).",
        "probes",
        {200: Answer(description="An HTML page.", media_type="text/html")},
    ),
    ("GET", "/docs/docs.js"): Operation(
        "The page's script.", "probes", {200: Answer(description="JavaScript.", media_type="text/javascript")}
    ),
    ("GET", "/docs/docs.css"): Operation(
        "The page's style sheet.", "probes", {200: Answer(description="CSS.", media_type="text/css")}
    ),
    # --- ingestion -------------------------------------------------------------------
    ("POST", "/integrations/kong/ingest"): Operation(
        "Ingest Kong HTTP Log payloads as usage events (deduplicated on request id).",
        "ingestion",
        {202: Answer(description='{"accepted", "duplicates"}.')},
        body=KongLog | list[KongLog],
        errors=frozenset({503}),
    ),
    ("POST", "/integrations/apigee/ingest"): Operation(
        "Ingest aggregated Apigee analytics.",
        "ingestion",
        {200: Answer(description='{"status": "ok", "recordsProcessed", "recordsSkipped"}.')},
        body=Analytics,
        errors=frozenset({503}),
    ),
    # --- API tokens --------------------------------------------------------------------
    ("POST", "/v1/admin/tokens"): Operation(
        "Mint an API token (the raw token is in this answer only).",
        "tokens",
        {201: Answer(TokenView, "The token, with its raw value once.")},
        body=TokenRequest,
        errors=frozenset({404}),
    ),
    ("GET", "/v1/admin/tokens"): Operation(
        "List the tenant's tokens (never their secrets).",
        "tokens",
        {200: Answer(description='{"items": [token]}.')},
        query=(TENANT,),
        errors=frozenset({404}),
    ),
    ("GET", "/v1/admin/tokens/{token_id}"): Operation(
        "Read one token.", "tokens", {200: Answer(TokenView)}, query=(TENANT,)
    ),
    ("DELETE", "/v1/admin/tokens/{token_id}"): Operation(
        "Revoke a token.", "tokens", {200: Answer(TokenView, "The token, revoked.")}, query=(TENANT,)
    ),
    ("POST", "/v1/admin/tokens/{token_id}/rotate"): Operation(
        "A new secret; the old one stays valid for a grace period.",
        "tokens",
        {200: Answer(TokenView, "The token, with its new raw value once.")},
        body=RotateRequest,
        body_required=False,
        query=(TENANT,),
    ),
    # --- plans -----------------------------------------------------------------------
    ("GET", "/v1/admin/plans"): Operation(
        "List the tenant's plans, paged by id.",
        "plans",
        {200: Answer(description='{"items": [plan], "next_cursor"}.')},
        query=(*PAGE, TENANT),
        errors=frozenset({404}),
    ),
    ("GET", "/v1/admin/plans/{plan_id}"): Operation(
        "Read one plan.", "plans", {200: Answer(Plan)}, query=(TENANT,)
    ),
    ("PUT", "/v1/admin/plans/{plan_id}"): Operation(
        "Create or replace a plan; its consumers follow.",
        "plans",
        {201: Answer(Plan, CREATED_OR_REPLACED), 200: Answer(Plan, CREATED_OR_REPLACED)},
        body=Plan,
        body_required=False,
        from_path=("id",),
    ),
    ("DELETE", "/v1/admin/plans/{plan_id}"): Operation(
        "Delete a plan no consumer is bound to.",
        "plans",
        {200: DELETED},
        query=(TENANT,),
        errors=frozenset({409}),
    ),
    # --- consumers, wallets, keys ----------------------------------------------------------
    ("GET", "/v1/admin/consumers"): Operation(
        "List the tenant's consumers, paged by id, by plan and status.",
        "consumers",
        {200: Answer(description='{"items": [consumer], "next_cursor"}.')},
        query=(
            *PAGE,
            Param("plan_id", "Only the consumers of this plan.", pattern=PLAN_ID_RE.pattern),
            Param("status", "Only consumers with this status.", enum=("active", "suspended", "revoked")),
            TENANT,
        ),
        errors=frozenset({404}),
    ),
    ("GET", "/v1/admin/consumers/{consumer_id}"): Operation(
        "Read one consumer: binding, status, wallet, windows.", "consumers", CONSUMER, query=(TENANT,)
    ),
    ("PUT", "/v1/admin/consumers/{consumer_id}"): Operation(
        "Create or update a consumer bound to a plan.",
        "consumers",
        {201: Answer(ConsumerView, CREATED_OR_REPLACED), 200: Answer(ConsumerView, CREATED_OR_REPLACED)},
        body=ConsumerSpec,
        errors=frozenset({409}),
        from_path=("id",),
    ),
    ("DELETE", "/v1/admin/consumers/{consumer_id}"): Operation(
        "Delete a consumer (its billing history stays).", "consumers", {200: DELETED}, query=(TENANT,)
    ),
    ("GET", "/v1/admin/consumers/{consumer_id}/keys"): Operation(
        "The consumer's API keys (hashes only).",
        "consumers",
        {200: Answer(description='{"tenant", "consumer_id", "keys": [key]}.')},
        query=(TENANT,),
    ),
    ("POST", "/v1/admin/consumers/{consumer_id}/keys"): Operation(
        "Create an API key (shown once), or register an existing one, with scopes and expiry.",
        "consumers",
        {201: Answer(description='{"api_key" (once), "key_hash", "consumer_id", "tenant", "scopes", ...}.')},
        body=KeyRequest,
        body_required=False,
        errors=frozenset({409}),
        from_path=("consumer_id",),
    ),
    ("DELETE", "/v1/admin/consumers/{consumer_id}/keys/{key_hash}"): Operation(
        "Revoke an API key.",
        "consumers",
        {200: Answer(description='{"revoked": true, "key_hash"}.')},
        query=(TENANT,),
    ),
    ("GET", "/v1/admin/consumers/{consumer_id}/wallet-notices"): Operation(
        "The wallet's lifecycle notices (suspended, resumed, topup_requested).",
        "consumers",
        {200: Answer(description='{"tenant", "consumer_id", "items": [notice]}.')},
        query=(TENANT,),
    ),
    ("POST", "/v1/admin/consumers/{consumer_id}/suspend"): _status_change(
        "Suspend a consumer (409 for a revoked one).", frozenset({409})
    ),
    ("POST", "/v1/admin/consumers/{consumer_id}/resume"): _status_change(
        "Resume a suspended consumer (409 for a revoked one).", frozenset({409})
    ),
    ("POST", "/v1/admin/consumers/{consumer_id}/revoke"): _status_change(
        "Revoke a consumer (final).", frozenset()
    ),
    ("POST", "/v1/admin/consumers/{consumer_id}/topup"): Operation(
        "Credit a wallet (once per reference).",
        "consumers",
        {200: Answer(description='{"balance", "applied"}.')},
        body=TopUp,
        from_path=("consumer_id",),
    ),
    ("GET", "/v1/usage/consumers/{consumer_id}/current"): Operation(
        "A consumer's current period: each window's used, limit, remaining, resets_at; the wallet.",
        "consumers",
        {200: Answer(CurrentUsage)},
        query=(TENANT,),
    ),
    ("GET", "/v1/usage/summary"): Operation(
        "Calls, charged micros and bytes per calendar bucket and group, from the rollups; JSON or CSV.",
        "consumers",
        {200: Answer(UsageSummary, "JSON, or CSV with Accept: text/csv; both streamed.", also=("text/csv",))},
        query=(
            Param("from", "Start, ISO 8601 (a date: midnight in tz); a whole hour.", required=True),
            Param("to", "End (exclusive), ISO 8601; a whole hour.", required=True),
            Param("granularity", "Bucket size (default day; week from Monday).", enum=GRANULARITIES),
            Param("group_by", "Comma-separated: consumer, product, plan, status."),
            Param("consumer_id", "Only this consumer.", pattern=CONSUMER_ID_CHARS),
            Param("product", "Only this product."),
            Param("tz", "IANA time zone of the calendar buckets (default UTC)."),
            TENANT,
        ),
        errors=frozenset({404}) | POSTGRES,
    ),
    ("GET", "/v1/admin/reconciliation"): Operation(
        "source=ledger (default): Redis windows against the ledger (a Report). source=gateway: the"
        " allowed calls against the gateway's counts per consumer, product and hour (tenant, source,"
        " start, end, threshold_pct, rows); JSON or CSV, streamed.",
        "consumers",
        {200: Answer(description="A Report, or the gateway comparison.", also=("text/csv",))},
        query=(
            Param("source", "What to compare with (default ledger).", enum=SOURCES),
            Param("from", "source=gateway: start, ISO 8601 (UTC unless given); a whole hour."),
            Param("to", "source=gateway: end (exclusive); a whole hour, at most 31 days on."),
            TENANT,
        ),
        errors=frozenset({404}) | POSTGRES,
    ),
    ("POST", "/v1/admin/reconciliation/gateway"): Operation(
        "Compare with the gateway's counts, store the run, alert on each flagged hour (once).",
        "consumers",
        {201: Answer(DriftRun)},
        query=(
            Param("from", "Start, ISO 8601 (UTC unless given); a whole hour.", required=True),
            Param("to", "End (exclusive); a whole hour, at most 31 days on.", required=True),
            TENANT,
        ),
        errors=frozenset({404}) | POSTGRES,
    ),
    # --- gateway connections ---------------------------------------------------------------
    ("GET", "/v1/admin/connections"): Operation(
        "List the tenant's gateway connections (secrets redacted).",
        "connections",
        {200: Answer(description='{"items": [connection]}.')},
        query=(TENANT,),
        errors=frozenset({404}) | POSTGRES,
    ),
    ("GET", "/v1/admin/connections/{connection_id}"): Operation(
        "Read one connection.", "connections", {200: Answer(ConnectionView)}, query=(TENANT,), errors=POSTGRES
    ),
    ("PUT", "/v1/admin/connections/{connection_id}"): Operation(
        "Create or replace a connection (secrets sealed at rest).",
        "connections",
        CONNECTION_SAVED,
        body=ConnectionSpec,
        errors=POSTGRES,
    ),
    ("DELETE", "/v1/admin/connections/{connection_id}"): Operation(
        "Delete a connection (nothing imported is deleted).",
        "connections",
        {200: DELETED},
        query=(TENANT,),
        errors=POSTGRES,
    ),
    ("POST", "/v1/admin/connections/{connection_id}/test"): Operation(
        "Count the gateway's objects once, within 5 s.", "connections", TEST, query=(TENANT,), errors=POSTGRES
    ),
    ("POST", "/v1/admin/connections/{connection_id}/preview"): Operation(
        "The diff an import would apply, and the token that applies exactly it.",
        "connections",
        IMPORT,
        query=(TENANT,),
        errors=GATEWAY_ERRORS,
    ),
    ("POST", "/v1/admin/connections/{connection_id}/apply"): Operation(
        "Apply exactly the previewed diff.",
        "connections",
        IMPORT,
        body=ApplyRequest,
        query=(TENANT,),
        errors=GATEWAY_ERRORS,
    ),
    # --- alerts and webhooks ---------------------------------------------------------------
    ("GET", "/v1/admin/alerts"): Operation(
        "The alerts that fired, newest first.",
        "alerts",
        {200: Answer(description='{"items": [alert], "next_cursor"}.')},
        query=(
            *PAGE,
            Param("consumer_id", "Only this consumer's alerts.", pattern=CONSUMER_ID_CHARS),
            Param("type", "Only alerts of this type.", enum=tuple(t.value for t in AlertType)),
            TENANT,
        ),
        errors=frozenset({404}) | POSTGRES,
    ),
    ("GET", "/v1/admin/alert-rules"): Operation(
        "The tenant's alert rules (the defaults until set).",
        "alerts",
        {200: Answer(AlertRules)},
        query=(TENANT,),
        errors=frozenset({404}) | POSTGRES,
    ),
    ("PUT", "/v1/admin/alert-rules"): Operation(
        "Set the tenant's alert rules (fields left out take their defaults).",
        "alerts",
        {200: Answer(AlertRules)},
        body=AlertRules,
        body_required=False,
        errors=POSTGRES,
    ),
    ("GET", "/v1/admin/webhooks"): Operation(
        "List the tenant's webhook endpoints.",
        "alerts",
        {200: Answer(description='{"items": [webhook]}.')},
        query=(TENANT,),
        errors=frozenset({404}) | POSTGRES,
    ),
    ("GET", "/v1/admin/webhooks/{webhook_id}"): Operation(
        "Read one webhook endpoint (never its secret).",
        "alerts",
        {200: Answer(WebhookView)},
        query=(TENANT,),
        errors=POSTGRES,
    ),
    ("PUT", "/v1/admin/webhooks/{webhook_id}"): Operation(
        "Create (its signing secret answered once) or replace a webhook endpoint.",
        "alerts",
        {201: Answer(WebhookView, CREATED_OR_REPLACED), 200: Answer(WebhookView, CREATED_OR_REPLACED)},
        body=WebhookSpec,
        errors=POSTGRES,
    ),
    ("DELETE", "/v1/admin/webhooks/{webhook_id}"): Operation(
        "Delete a webhook endpoint; its pending deliveries are given up, the log stays.",
        "alerts",
        {200: DELETED},
        query=(TENANT,),
        errors=POSTGRES,
    ),
    ("POST", "/v1/admin/webhooks/{webhook_id}/secret"): Operation(
        "A new signing secret, answered once.",
        "alerts",
        {200: Answer(WebhookView)},
        query=(TENANT,),
        errors=POSTGRES,
    ),
    ("GET", "/v1/admin/webhooks/{webhook_id}/deliveries"): Operation(
        "The delivery log, newest first: status, attempts, last error, next attempt.",
        "alerts",
        {200: Answer(description='{"items": [delivery], "next_cursor"}.')},
        query=(*PAGE, Param("status", "Only deliveries in this status.", enum=DELIVERY_STATUSES), TENANT),
        errors=POSTGRES,
    ),
    ("POST", "/v1/admin/webhooks/{webhook_id}/deliveries/{delivery_id}/redeliver"): Operation(
        "Send a delivery again, with the same webhook-id.",
        "alerts",
        {202: Answer(description='{"redelivering": true, "tenant", "webhook_id", "id"}.')},
        query=(TENANT,),
        errors=frozenset({409}) | POSTGRES,
    ),
    # --- Kong and Konnect ------------------------------------------------------------------
    ("POST", "/integrations/kong/suspend"): _seed_status("Suspend", "kong", StatusChange),
    ("POST", "/integrations/kong/resume"): _seed_status("Resume", "kong", StatusChange),
    ("POST", "/integrations/kong/enforce/groups"): Operation(
        "Push a plan's limits to a Kong consumer group's rate limiting.",
        "kong",
        {200: Answer(description='{"group", "config", "result"}.')},
        body=EnforceGroup,
        errors=frozenset({404}) | GATEWAY_ERRORS,
    ),
    ("GET", "/integrations/kong/health"): _health("Kong", "kong"),
    ("GET", "/integrations/konnect/health"): _health("Konnect", "kong"),
    ("POST", "/integrations/konnect/connection"): _seed_connection("Konnect", "kong"),
    ("GET", "/integrations/konnect/connection/test"): Operation(
        "Test a Konnect connection (seed contract).",
        "kong",
        TEST,
        query=(TENANT, CONNECTION),
        errors=frozenset({404}) | POSTGRES,
    ),
    **{
        ("GET", f"/integrations/konnect/{kind}"): Operation(
            f"List a Konnect control plane's {kind.replace('-', ' ')}, every page.",
            "kong",
            {200: Answer(description='{"data": [Konnect object]}.')},
            query=(TENANT, CONNECTION),
            errors=frozenset({404}) | GATEWAY_ERRORS,
        )
        for kind in ("services", "routes", "consumers", "consumer-groups")
    },
    ("POST", "/integrations/konnect/runtime/preview"): Operation(
        "Preview a Konnect import (seed contract).",
        "kong",
        IMPORT,
        query=(TENANT, CONNECTION),
        errors=frozenset({404}) | GATEWAY_ERRORS,
    ),
    ("POST", "/integrations/konnect/runtime/apply"): Operation(
        "Apply a previewed Konnect import (seed contract).",
        "kong",
        IMPORT,
        body=ApplyRequest,
        query=(TENANT, CONNECTION),
        errors=frozenset({404}) | GATEWAY_ERRORS,
    ),
    # --- Apigee ------------------------------------------------------------------------
    ("POST", "/integrations/apigee/suspend"): _seed_status("Suspend (or revoke)", "apigee", AppStatusChange),
    ("POST", "/integrations/apigee/resume"): _seed_status("Resume", "apigee", AppStatusChange),
    ("POST", "/integrations/apigee/connect"): _seed_connection("Apigee", "apigee"),
    ("POST", "/integrations/apigee/catalog/sync"): Operation(
        "Preview an Apigee catalog import, or apply a previewed one.",
        "apigee",
        IMPORT,
        body=CatalogSync,
        body_required=False,
        errors=frozenset({404}) | GATEWAY_ERRORS,
    ),
    ("POST", "/integrations/apigee/enforce/quotas"): Operation(
        "Set an API product's quota to the plan's through the Management API.",
        "apigee",
        {200: Answer(description='{"product", "quota", "result"}.')},
        body=EnforceQuota,
        errors=frozenset({404}) | GATEWAY_ERRORS,
    ),
    ("GET", "/integrations/apigee/health"): _health("Apigee", "apigee"),
}
