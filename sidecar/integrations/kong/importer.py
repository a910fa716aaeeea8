"""Read a Kong or Konnect connection's catalog: one complete walk of its Admin API
(Konnect: the control plane's core entities, the same objects), mapped."""

from __future__ import annotations

from contextlib import aclosing
from typing import Any

from sidecar.core.catalog_diff import Mapped
from sidecar.integrations.connections import ConnectionSpec
from sidecar.integrations.gateway_http import GatewayError
from sidecar.integrations.kong.admin_client import KongAdminClient, set_denied
from sidecar.integrations.kong.mapping import map_catalog

TEST_TIMEOUT_S = 5.0


def client_for(spec: ConnectionSpec, **http: Any) -> KongAdminClient:
    """A Kong Admin API client, or a Konnect control plane's (type ``konnect``)."""
    return KongAdminClient(
        spec.base_url,
        token=spec.token,
        workspace=spec.workspace,
        control_plane_id=spec.control_plane_id if spec.type == "konnect" else None,
        **http,
    )


async def read_catalog(spec: ConnectionSpec) -> Mapped:
    async with aclosing(client_for(spec)) as client:
        snapshot = await client.snapshot()
    return map_catalog(snapshot, spec.kong_mapping(), spec.tenant)


async def counts(spec: ConnectionSpec) -> dict[str, int]:
    """What a connection test reports; one attempt per call, bounded by the test's 5 s."""
    async with aclosing(client_for(spec, timeout_s=TEST_TIMEOUT_S, attempts=1)) as client:
        return await client.counts()


async def reach(spec: ConnectionSpec) -> tuple[bool, str | None, dict[str, Any]]:
    """Reachable, the error code if not, and what the gateway says of itself: Kong's
    ``GET /status`` (its database reachable), or the Konnect control plane's name."""
    try:
        async with aclosing(client_for(spec, timeout_s=TEST_TIMEOUT_S, attempts=1)) as client:
            if client.control_plane is not None:
                plane = await client.http.request("GET", client.control_plane)
                return True, None, {"control_plane": plane.get("name") if isinstance(plane, dict) else None}
            database = (await client.status()).get("database")
    except GatewayError as exc:
        return False, exc.code, {}
    return (
        True,
        None,
        {"database_reachable": database.get("reachable") if isinstance(database, dict) else None},
    )


async def set_status(spec: ConnectionSpec, consumer_id: str, active: bool) -> str:
    """Push a consumer's status: suspended or revoked joins the mapping's ACL deny group,
    active leaves it."""
    mapping = spec.kong_mapping()
    async with aclosing(client_for(spec)) as client:
        return await set_denied(client, consumer_id, mapping.consumer_field, mapping.deny_group, not active)
