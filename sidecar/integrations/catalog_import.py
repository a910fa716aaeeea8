"""Import a gateway's catalog through a connection: preview the diff, then apply exactly
that diff through the admin write path (Postgres first, audited, then the hot store).

A preview's token is a digest of its changes. Apply reads the gateway and the truth
again and proceeds only when the token is the same, else 409 ``catalog_changed``: what
an operator approved is what is written. A walk of the gateway that fails part way
raises before anything is compared, so nothing is applied from a partial catalog.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, NamedTuple

import msgspec

from sidecar.core.catalog_diff import Catalog, Change, Diff, Mapped, Skipped, diff
from sidecar.core.errors import Conflict, NotFound
from sidecar.core.models import ConsumerKey, ConsumerSpec, ConsumerStatus
from sidecar.integrations.apigee import importer as apigee_importer
from sidecar.integrations.connection_store import ConnectionStore
from sidecar.integrations.connections import ConnectionSpec, SyncResult
from sidecar.integrations.gateway_http import GatewayError
from sidecar.integrations.kong import importer as kong_importer
from sidecar.reconciler.catalog import PostgresCatalog
from sidecar.reconciler.ledger import Ledger


class Gateway(NamedTuple):
    """What each connection type can do: read its catalog (mapped), count it (a
    connection test), and say whether it is reachable (health: ok, error code, details)."""

    read: Callable[[ConnectionSpec], Awaitable[Mapped]]
    count: Callable[[ConnectionSpec], Awaitable[dict[str, int]]]
    reach: Callable[[ConnectionSpec], Awaitable[tuple[bool, str | None, dict[str, Any]]]]
    # Push a consumer's status (active or not) to the gateway: "updated" or "unchanged".
    set_status: Callable[[ConnectionSpec, str, bool], Awaitable[str]]


_KONG = Gateway(
    kong_importer.read_catalog, kong_importer.counts, kong_importer.reach, kong_importer.set_status
)
GATEWAYS: dict[str, Gateway] = {
    "kong": _KONG,
    "konnect": _KONG,
    "apigee": Gateway(
        apigee_importer.read_catalog,
        apigee_importer.counts,
        apigee_importer.reach,
        apigee_importer.set_status,
    ),
}


class ImportResult(msgspec.Struct):
    """A preview (what an apply with ``token`` will write) or an apply (what it wrote)."""

    connection_id: str
    tenant: str
    token: str
    counts: dict[str, int]
    changes: list[Change]
    skipped: list[Skipped]


async def current_catalog(ledger: Ledger, tenant: str) -> Catalog:
    """What the truth holds for ``tenant`` (deleted objects left out)."""
    plans = {row.plan.id: row.plan for row in await ledger.plans(tenant)}
    consumers = {row.id: row.spec() for row in await ledger.consumers(tenant)}
    keys = await ledger.active_keys(tenant)
    return Catalog(
        plans=plans,
        consumers=consumers,
        keys={consumer_id: frozenset(by_hash) for (_, consumer_id), by_hash in keys.items()},
    )


async def _connection(store: ConnectionStore, tenant: str, connection_id: str) -> ConnectionSpec:
    spec = await store.load(tenant, connection_id)
    if spec is None:
        raise NotFound(f"connection {connection_id!r} does not exist", code="connection_not_found")
    return spec


async def _plan(
    store: ConnectionStore, ledger: Ledger, tenant: str, connection_id: str
) -> tuple[ConnectionSpec, Mapped, Diff]:
    spec = await _connection(store, tenant, connection_id)
    mapped = await GATEWAYS[spec.type].read(spec)
    owned = await store.owned(tenant, connection_id, "consumer")
    current = await current_catalog(ledger, tenant)
    # Apigee holds a pushed suspension as a revoked app: reading it back is no revocation.
    echoes = spec.type == "apigee" and spec.pushes_status()
    return spec, mapped, diff(mapped.catalog, current, owned, spec.removal, suspension_echoed=echoes)


async def preview(store: ConnectionStore, ledger: Ledger, tenant: str, connection_id: str) -> ImportResult:
    _, mapped, planned = await _plan(store, ledger, tenant, connection_id)
    changes = list(planned.changes)
    return ImportResult(connection_id, tenant, planned.token, planned.counts(), changes, mapped.skipped)


async def apply(
    store: ConnectionStore,
    ledger: Ledger,
    catalog: PostgresCatalog,
    tenant: str,
    connection_id: str,
    token: str | None,
) -> ImportResult:
    """Apply the previewed diff (``token``; None applies whatever the diff is now: the
    periodic sync). The actor of every write is the connection."""
    try:
        _, mapped, planned = await _plan(store, ledger, tenant, connection_id)
    except GatewayError as exc:
        await store.record_sync(tenant, connection_id, _result(False, {}, exc))
        raise
    if token is not None and token != planned.token:
        raise Conflict(
            "the gateway or the sidecar's catalog changed since the preview: preview again",
            code="catalog_changed",
        )
    actor = f"connection:{connection_id}"
    desired = mapped.catalog
    skipped = list(mapped.skipped)
    for change in planned.changes:
        try:
            await _write(catalog, desired, tenant, change, actor)
        except Conflict as exc:  # a key another consumer holds: never moved by an import
            skipped.append(Skipped(change.kind, change.id, exc.message))
    await store.own(tenant, connection_id, "consumer", set(desired.consumers))
    await store.own(tenant, connection_id, "plan", set(desired.plans))
    counts = planned.counts()
    await store.record_sync(tenant, connection_id, _result(True, counts, None))
    return ImportResult(connection_id, tenant, planned.token, counts, list(planned.changes), skipped)


async def _write(catalog: PostgresCatalog, desired: Catalog, tenant: str, change: Change, actor: str) -> None:
    if change.kind == "plan":
        await catalog.put_plan(desired.plans[change.id], actor)
    elif change.kind == "consumer" and change.action == "revoke":
        await catalog.set_status(tenant, change.id, ConsumerStatus.REVOKED, actor)
    elif change.kind == "consumer":
        spec: ConsumerSpec = desired.consumers[change.id]
        if change.action == "change":
            # Only what differs is written: the wallet mode (set on creation) and a
            # status the gateway did not change keep their values.
            status = spec.status if "status" in change.fields else None
            spec = msgspec.structs.replace(spec, status=status, wallet_mode=None)
        await catalog.put_consumer(spec, actor)
    else:
        consumer_id, _, key_hash = change.id.partition("/")
        if change.action == "revoke":
            await catalog.revoke_key(tenant, consumer_id, key_hash, actor)
        else:
            await catalog.add_key(tenant, consumer_id, ConsumerKey(key_hash), actor)


def _result(ok: bool, counts: dict[str, int], error: GatewayError | None) -> SyncResult:
    return SyncResult(
        at=datetime.now(tz=UTC).isoformat(),
        ok=ok,
        counts=counts,
        error=None if error is None else error.code,
        message=None if error is None else error.message,
    )


async def check_connection(store: ConnectionStore, tenant: str, connection_id: str) -> dict[str, object]:
    """``{"ok": true, "counts": {...}}`` or ``{"ok": false, "error": code, "message"}``."""
    spec = await store.load(tenant, connection_id)
    if spec is None:
        raise NotFound(f"connection {connection_id!r} does not exist", code="connection_not_found")
    try:
        return {"ok": True, "counts": await GATEWAYS[spec.type].count(spec)}
    except GatewayError as exc:
        return {"ok": False, "error": exc.code, "message": exc.message}
