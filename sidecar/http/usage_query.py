"""What a consumer has used, for billing teams and customer portals.

    GET /v1/usage/consumers/{consumer_id}/current[?tenant=]

The current period of each limited window (used, limit, remaining, resets_at) and the
wallet, read from the hot store: what the very next decision sees. For the admin,
billing and viewer roles, and a developer token for its own consumers."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sidecar.core.clock import now_ms
from sidecar.core.current_usage import current_usage
from sidecar.core.errors import NotFound
from sidecar.core.models import CONSUMER_ID_RE, check_id
from sidecar.http.access import scope_consumer
from sidecar.http.admin_request import json_response, tenant_param


async def current(request: Request) -> Response:
    tenant = tenant_param(request)
    consumer_id = check_id(request.path_params["consumer_id"], CONSUMER_ID_RE, "consumer_id")
    scope_consumer(request, tenant, consumer_id)
    store = request.app.state.store
    now = now_ms()
    view = await store.get_consumer(tenant, consumer_id, now)
    if view is None:
        raise NotFound(f"consumer {consumer_id!r} does not exist", code="consumer_not_found")
    plan = await store.get_plan(tenant, view.plan_id)
    if plan is None:  # deleted under it (a plan in use cannot be, but a race can)
        raise NotFound(f"plan {view.plan_id!r} does not exist", code="plan_not_found")
    return json_response(current_usage(view, plan, now))


ROUTES = [Route("/v1/usage/consumers/{consumer_id}/current", current, methods=["GET"])]
