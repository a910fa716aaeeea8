"""Kong-specific routes: native enforcement pushed through a connection's Admin API."""

from __future__ import annotations

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sidecar.core.errors import InvalidInput, NotFound
from sidecar.core.models import DEFAULT_TENANT, PLAN_ID_RE, check_id
from sidecar.core.windows import parse_window
from sidecar.http.admin import _actor, _admin_body, _json, _record
from sidecar.http.bodies import decode_into
from sidecar.http.connections import guarded, postgres
from sidecar.integrations.connections import CONNECTION_ID_RE
from sidecar.integrations.kong.admin_client import enforce_group
from sidecar.integrations.kong.importer import client_for
from sidecar.integrations.kong.mapping import UnsupportedWindow, rate_limiting_config


class EnforceGroup(msgspec.Struct, forbid_unknown_fields=True):
    """The limits of a consumer group (its id or name): ``limits`` as given, else those
    of ``plan_id`` in the sidecar's catalog."""

    connection_id: str
    group: str
    tenant: str = DEFAULT_TENANT
    plan_id: str | None = None
    limits: dict[str, int] | None = None


async def enforce_groups(request: Request) -> Response:
    ask = decode_into(await _admin_body(request), EnforceGroup)
    check_id(ask.connection_id, CONNECTION_ID_RE, "connection_id")
    if not 1 <= len(ask.group) <= 200:
        raise InvalidInput("group must be 1 to 200 characters", field="group")
    catalog, store = await postgres(request)
    limits = ask.limits
    if limits is None:
        if ask.plan_id is None:
            raise InvalidInput("give limits or a plan_id to take them from", field="plan_id")
        check_id(ask.plan_id, PLAN_ID_RE, "plan_id")
        plans = await (await catalog.ledger()).plans(ask.tenant, ask.plan_id)
        if not plans:
            raise NotFound(f"plan {ask.plan_id!r} does not exist", code="plan_not_found")
        limits = plans[0].plan.windows
    for window, limit in limits.items():
        try:
            parse_window(window)
        except ValueError as exc:
            raise InvalidInput(str(exc), code="unknown_window", field=f"limits.{window}") from None
        if limit < 0:
            raise InvalidInput("a limit is 0 or more", code="invalid_limit", field=f"limits.{window}")
    try:
        config = rate_limiting_config(limits)
    except UnsupportedWindow as exc:
        raise InvalidInput(str(exc), code="unknown_window", field="limits") from None
    spec = await guarded(store.load(ask.tenant, ask.connection_id))
    if spec is None or spec.type != "kong":
        raise NotFound(f"kong connection {ask.connection_id!r} does not exist", code="connection_not_found")
    client = client_for(spec)
    try:
        result = await guarded(enforce_group(client, ask.group, config))
    finally:
        await client.close()
    detail = {"group": ask.group, "config": config, "result": result}
    if result != "unchanged":
        await store.audit_push(ask.tenant, ask.connection_id, _actor(request), "kong.enforce_group", detail)
    _record(request, "kong.enforce_group", ask.tenant, ask.connection_id, group=ask.group, result=result)
    return _json(detail)


ROUTES = [Route("/integrations/kong/enforce/groups", enforce_groups, methods=["POST"])]
