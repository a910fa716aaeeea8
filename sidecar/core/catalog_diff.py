"""The difference between the catalog a gateway holds and the one the sidecar holds:
what an import would add, change and revoke. Pure: catalogs in, a diff out.

A diff is applied exactly as previewed: its ``token`` is a digest of every change, so
an apply that recomputes the diff and finds another token knows the truth (or the
gateway) moved in between. Nothing is ever deleted by an import: what disappeared from
the gateway is revoked (consumers, keys), so usage, wallets and ledgers stay.
"""

from __future__ import annotations

import enum
import hashlib

import msgspec

from sidecar.core.models import ConsumerSpec, ConsumerStatus, Plan


class Removal(enum.StrEnum):
    """What an import does with what the gateway no longer has."""

    REVOKE = "revoke"
    IGNORE = "ignore"


class Catalog(msgspec.Struct, frozen=True):
    """Plans, consumers and each consumer's key hashes, by id (one tenant)."""

    plans: dict[str, Plan] = {}
    consumers: dict[str, ConsumerSpec] = {}
    keys: dict[str, frozenset[str]] = {}


class Skipped(msgspec.Struct, frozen=True):
    """An object of the gateway the mapping left out, and why."""

    kind: str
    id: str
    reason: str


class Mapped(msgspec.Struct, frozen=True):
    """A gateway's catalog as the sidecar's, and what did not map."""

    catalog: Catalog
    skipped: list[Skipped]


class Change(msgspec.Struct, frozen=True, omit_defaults=True):
    """One object added, changed (``fields``: the names that differ) or revoked."""

    kind: str  # plan | consumer | key
    id: str  # a key's id is "<consumer id>/<key hash>"
    action: str  # add | change | revoke
    fields: tuple[str, ...] = ()


class Diff(msgspec.Struct, frozen=True):
    changes: tuple[Change, ...]
    token: str

    def counts(self) -> dict[str, int]:
        """``{"plan.add": 3, "consumer.add": 250, ...}``."""
        out: dict[str, int] = {}
        for change in self.changes:
            name = f"{change.kind}.{change.action}"
            out[name] = out.get(name, 0) + 1
        return out


_PLAN_FIELDS = ("windows", "price", "products", "name")
_CONSUMER_FIELDS = ("plan_id", "status")


def _differing(desired: msgspec.Struct, held: msgspec.Struct, fields: tuple[str, ...]) -> tuple[str, ...]:
    """The fields ``desired`` sets (None: the source says nothing) that ``held`` lacks."""
    return tuple(
        f for f in fields if getattr(desired, f) is not None and getattr(desired, f) != getattr(held, f)
    )


def _consumer_fields(desired: ConsumerSpec, held: ConsumerSpec, suspension_echoed: bool) -> tuple[str, ...]:
    """What differs. A gateway that says "active" never ends a suspension the sidecar made
    (an admin's, or a wallet's): only a revocation or its end is the gateway's to say; and
    where the sidecar pushes its suspensions to the gateway as a revocation
    (``suspension_echoed``), the gateway's "revoked" of a suspended consumer is that echo."""
    fields = _differing(desired, held, _CONSUMER_FIELDS)
    if held.status is ConsumerStatus.SUSPENDED and (
        desired.status is ConsumerStatus.ACTIVE
        or (suspension_echoed and desired.status is ConsumerStatus.REVOKED)
    ):
        fields = tuple(f for f in fields if f != "status")
    return fields


def diff(
    desired: Catalog,
    current: Catalog,
    owned: frozenset[str],
    removal: Removal,
    *,
    suspension_echoed: bool = False,
) -> Diff:
    """What makes ``current`` hold ``desired``. ``owned`` are the consumer ids an earlier
    import of this source brought in: only those may be revoked when the gateway no
    longer has them (a consumer created by hand is never touched)."""
    changes: list[Change] = []
    for plan_id, plan in sorted(desired.plans.items()):
        held = current.plans.get(plan_id)
        if held is None:
            changes.append(Change("plan", plan_id, "add"))
        elif fields := _differing(plan, held, _PLAN_FIELDS):
            changes.append(Change("plan", plan_id, "change", fields))
    for consumer_id, spec in sorted(desired.consumers.items()):
        held_consumer = current.consumers.get(consumer_id)
        if held_consumer is None:
            changes.append(Change("consumer", consumer_id, "add"))
        elif fields := _consumer_fields(spec, held_consumer, suspension_echoed):
            changes.append(Change("consumer", consumer_id, "change", fields))
        held_keys = current.keys.get(consumer_id, frozenset())
        for key_hash in sorted(desired.keys.get(consumer_id, frozenset()) - held_keys):
            changes.append(Change("key", f"{consumer_id}/{key_hash}", "add"))
        if removal is Removal.REVOKE and consumer_id in owned:
            for key_hash in sorted(held_keys - desired.keys.get(consumer_id, frozenset())):
                changes.append(Change("key", f"{consumer_id}/{key_hash}", "revoke"))
    if removal is Removal.REVOKE:
        for consumer_id in sorted(owned - desired.consumers.keys()):
            held_consumer = current.consumers.get(consumer_id)
            if held_consumer is not None and held_consumer.status is not ConsumerStatus.REVOKED:
                changes.append(Change("consumer", consumer_id, "revoke"))
    return Diff(tuple(changes), _token(desired, changes))


def _token(desired: Catalog, changes: list[Change]) -> str:
    """A digest of the changes and of the values they write: the same token means the
    same writes."""
    digest = hashlib.sha256()
    for change in changes:
        digest.update(msgspec.json.encode(change))
        if change.action != "revoke" and change.kind == "plan":
            digest.update(msgspec.json.encode(desired.plans[change.id]))
        elif change.action != "revoke" and change.kind == "consumer":
            digest.update(msgspec.json.encode(desired.consumers[change.id]))
    return digest.hexdigest()[:32]
