"""Alerts, the tenants' alert rules, and the webhook endpoints alerts are delivered to
with their delivery log. Postgres-backed: without it, 501 ``postgres_required``; a
signing secret needs ``secret_keys`` (501 ``secret_keys_required`` otherwise).

    GET /v1/admin/alerts                               what fired, newest first
    GET/PUT /v1/admin/alert-rules                      a tenant's rules
    GET/PUT/DELETE /v1/admin/webhooks/{webhook_id}     GET /v1/admin/webhooks
    POST /v1/admin/webhooks/{webhook_id}/secret        a new signing secret, shown once
    GET  /v1/admin/webhooks/{webhook_id}/deliveries    the log, newest first
    POST /v1/admin/webhooks/{webhook_id}/deliveries/{delivery_id}/redeliver
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sidecar.core.alerts import AlertRules, AlertType
from sidecar.core.digits import digits
from sidecar.core.errors import InvalidInput, NotFound
from sidecar.core.models import CONSUMER_ID_RE, check_id
from sidecar.core.webhooks import WEBHOOK_ID_RE, WebhookSpec
from sidecar.http.access import scope
from sidecar.http.admin_request import (
    Page,
    actor,
    admin_body,
    json_response,
    page_cursor,
    page_request,
    record,
    tenant_param,
)
from sidecar.http.bodies import decode_into
from sidecar.http.connections import guarded, postgres
from sidecar.integrations.secret_box import SecretBox
from sidecar.reconciler.webhook_store import WebhookStore

DELIVERY_STATUSES = ("pending", "delivered", "failed")
MAX_ID = 2**63 - 1


async def _store(request: Request) -> WebhookStore:
    catalog, _ = await postgres(request)
    ledger = await catalog.ledger()
    settings = request.app.state.settings
    return WebhookStore(ledger.pool, SecretBox(settings.secret_keys) if settings.secret_keys else None)


def _webhook_id(request: Request) -> str:
    return check_id(request.path_params["webhook_id"], WEBHOOK_ID_RE, "webhook_id")


def _not_found(webhook_id: str) -> NotFound:
    return NotFound(f"webhook {webhook_id!r} does not exist", code="webhook_not_found")


def _number(text: str, field: str) -> int:
    if not digits(text) or not 1 <= int(text) <= MAX_ID:
        raise InvalidInput(f"{field} must be a delivery or alert id", field=field)
    return int(text)


def _before(request: Request) -> tuple[int | None, int]:
    """The page of a newest-first log: the id to continue below, and the size."""
    after, limit = page_request(request)
    return (None if after is None else _number(after, "cursor")), limit


def _page(items: list, limit: int) -> Page:  # type: ignore[type-arg]
    return Page(items, page_cursor(items[-1].id) if len(items) == limit else None)


async def put_webhook(request: Request) -> Response:
    body = await admin_body(request)
    webhook_id = _webhook_id(request)
    spec = decode_into(body, WebhookSpec).validated()
    scope(request, spec.tenant)
    store = await _store(request)
    view, created = await guarded(store.put(webhook_id, spec, actor(request)))
    record(request, "webhook.put", spec.tenant, webhook_id, url=spec.url, events=spec.events)
    return json_response(view, 201 if created else 200)


async def get_webhook(request: Request) -> Response:
    tenant, webhook_id = tenant_param(request), _webhook_id(request)
    view = await (await _store(request)).get(tenant, webhook_id)
    if view is None:
        raise _not_found(webhook_id)
    return json_response(view)


async def list_webhooks(request: Request) -> Response:
    store = await _store(request)
    return json_response({"items": await store.list(tenant_param(request))})


async def delete_webhook(request: Request) -> Response:
    tenant, webhook_id = tenant_param(request), _webhook_id(request)
    if not await (await _store(request)).delete(tenant, webhook_id, actor(request)):
        raise _not_found(webhook_id)
    record(request, "webhook.delete", tenant, webhook_id)
    return json_response({"deleted": True, "tenant": tenant, "id": webhook_id})


async def rotate_secret(request: Request) -> Response:
    tenant, webhook_id = tenant_param(request), _webhook_id(request)
    store = await _store(request)
    view = await guarded(store.rotate_secret(tenant, webhook_id, actor(request)))
    if view is None:
        raise _not_found(webhook_id)
    record(request, "webhook.rotate_secret", tenant, webhook_id)
    return json_response(view)


async def list_deliveries(request: Request) -> Response:
    tenant, webhook_id = tenant_param(request), _webhook_id(request)
    status = request.query_params.get("status")
    if status is not None and status not in DELIVERY_STATUSES:
        raise InvalidInput(f"status must be one of {', '.join(DELIVERY_STATUSES)}", field="status")
    before, limit = _before(request)
    store = await _store(request)
    if await store.get(tenant, webhook_id) is None:
        raise _not_found(webhook_id)
    return json_response(_page(await store.deliveries(tenant, webhook_id, status, limit, before), limit))


async def redeliver(request: Request) -> Response:
    tenant, webhook_id = tenant_param(request), _webhook_id(request)
    delivery_id = _number(request.path_params["delivery_id"], "delivery_id")
    store = await _store(request)
    if await store.get(tenant, webhook_id) is None:
        raise _not_found(webhook_id)
    if not await store.redeliver(tenant, webhook_id, delivery_id, actor(request)):
        raise NotFound(f"delivery {delivery_id} does not exist", code="delivery_not_found")
    record(request, "webhook.redeliver", tenant, webhook_id, delivery_id=delivery_id)
    return json_response(
        {"redelivering": True, "tenant": tenant, "webhook_id": webhook_id, "id": str(delivery_id)}, 202
    )


async def list_alerts(request: Request) -> Response:
    tenant = tenant_param(request)
    params = request.query_params
    consumer_id = params.get("consumer_id")
    if consumer_id is not None:
        check_id(consumer_id, CONSUMER_ID_RE, "consumer_id")
    alert_type = params.get("type")
    if alert_type is not None and alert_type not in {t.value for t in AlertType}:
        raise InvalidInput(f"type must be one of {', '.join(t.value for t in AlertType)}", field="type")
    before, limit = _before(request)
    store = await _store(request)
    return json_response(_page(await store.alerts(tenant, consumer_id, alert_type, limit, before), limit))


async def get_rules(request: Request) -> Response:
    tenant = tenant_param(request)
    store = await _store(request)
    return json_response(await store.rules(tenant))


async def put_rules(request: Request) -> Response:
    body = await admin_body(request)
    rules = decode_into(body, AlertRules).validated()
    scope(request, rules.tenant)
    store = await _store(request)
    await store.put_rules(rules, actor(request))
    record(request, "alert_rules.put", rules.tenant, rules.tenant)
    return json_response(rules)


ROUTES = [
    Route("/v1/admin/alert-rules", get_rules, methods=["GET"]),
    Route("/v1/admin/alert-rules", put_rules, methods=["PUT"]),
    Route("/v1/admin/webhooks", list_webhooks, methods=["GET"]),
    Route("/v1/admin/webhooks/{webhook_id}", put_webhook, methods=["PUT"]),
    Route("/v1/admin/webhooks/{webhook_id}", get_webhook, methods=["GET"]),
    Route("/v1/admin/webhooks/{webhook_id}", delete_webhook, methods=["DELETE"]),
    Route("/v1/admin/webhooks/{webhook_id}/secret", rotate_secret, methods=["POST"]),
    Route("/v1/admin/webhooks/{webhook_id}/deliveries", list_deliveries, methods=["GET"]),
    Route("/v1/admin/webhooks/{webhook_id}/deliveries/{delivery_id}/redeliver", redeliver, methods=["POST"]),
    Route("/v1/admin/alerts", list_alerts, methods=["GET"]),
]
