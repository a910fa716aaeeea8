"""Read a Kong or Konnect connection's catalog: one complete walk of its Admin API
(Konnect: the control plane's core entities, the same objects), mapped."""

from __future__ import annotations

from typing import Any

from sidecar.integrations.connections import ConnectionSpec
from sidecar.integrations.kong.admin_client import KongAdminClient
from sidecar.integrations.kong.mapping import Mapped, map_catalog

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
    client = client_for(spec)
    try:
        snapshot = await client.snapshot()
    finally:
        await client.close()
    return map_catalog(snapshot, spec.kong_mapping(), spec.tenant)


async def counts(spec: ConnectionSpec) -> dict[str, int]:
    """What a connection test reports; one attempt per call, bounded by the test's 5 s."""
    client = client_for(spec, timeout_s=TEST_TIMEOUT_S, attempts=1)
    try:
        return await client.counts()
    finally:
        await client.close()
