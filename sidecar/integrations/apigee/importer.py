"""Read an Apigee connection's catalog: one complete walk of its Management API, mapped;
count it for a connection test; check it is reachable for the health endpoint."""

from __future__ import annotations

import time
from contextlib import aclosing
from typing import Any

from sidecar.core.catalog_diff import Mapped
from sidecar.integrations.apigee.management_client import ApigeeClient
from sidecar.integrations.apigee.mapping import map_catalog
from sidecar.integrations.connections import ConnectionSpec
from sidecar.integrations.gateway_http import GatewayError

TEST_TIMEOUT_S = 5.0


def client_for(spec: ConnectionSpec, **http: Any) -> ApigeeClient:
    mapping = spec.apigee_mapping()
    return ApigeeClient(
        spec.base_url,
        spec.organization or "",
        api=mapping.api,
        token=spec.token,
        username=spec.username,
        password=spec.password,
        page_size=mapping.page_size,
        **http,
    )


async def read_catalog(spec: ConnectionSpec) -> Mapped:
    async with aclosing(client_for(spec)) as client:
        snapshot = await client.snapshot()
    now_ms = int(time.time() * 1000)
    return map_catalog(snapshot, spec.apigee_mapping(), spec.environments, spec.tenant, now_ms)


async def counts(spec: ConnectionSpec) -> dict[str, int]:
    """What a connection test reports; one attempt per call, bounded by the test's 5 s."""
    async with aclosing(client_for(spec, timeout_s=TEST_TIMEOUT_S, attempts=1)) as client:
        return await client.counts()


async def reach(spec: ConnectionSpec) -> tuple[bool, str | None, dict[str, Any]]:
    """Reachable (the organization answers with these credentials), the error code if
    not, and what the gateway says of itself (the organization's runtime type)."""
    try:
        async with aclosing(client_for(spec, timeout_s=TEST_TIMEOUT_S, attempts=1)) as client:
            org = await client.organization()
    except GatewayError as exc:
        return False, exc.code, {}
    return True, None, {k: org[k] for k in ("runtimeType", "type") if isinstance(org.get(k), str)}


async def set_status(spec: ConnectionSpec, consumer_id: str, active: bool) -> str:
    """Push a consumer's status: its developer app approved (active) or revoked
    (suspended or revoked)."""
    mapping = spec.apigee_mapping()
    async with aclosing(client_for(spec)) as client:
        app_id = consumer_id if mapping.consumer_field == "appId" else await client.app_id_named(consumer_id)
        return await client.set_app_status(app_id, approved=active)
