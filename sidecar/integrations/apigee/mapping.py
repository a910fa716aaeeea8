"""Apigee's catalog as the sidecar's: API products become plans, developer apps become
consumers bound to the plan of one of their products, approved credentials' consumer keys
become registered keys. Pure: the objects the Management API returned in, a catalog (and
what was skipped, and why) out. The README's "Apigee import mapping" table states the same
rules.

Object shapes: Apigee API reference (https://cloud.google.com/apigee/docs/reference/apis/
apigee/rest/v1/organizations.apiproducts, .../organizations.developers,
.../organizations.apps; Edge: https://apidocs.apigee.com/docs/api-products/1/overview):
products carry ``quota``, ``quotaInterval`` and ``quotaTimeUnit`` as strings and
``attributes`` as ``[{"name", "value"}]``; an app's products are granted per credential
(``credentials[].apiProducts[]``, each with its own status).
"""

from __future__ import annotations

from typing import Literal

import msgspec

from sidecar.core.api_keys import hash_api_key
from sidecar.core.catalog_diff import Catalog, Mapped, Skipped
from sidecar.core.digits import digits
from sidecar.core.models import (
    CONSUMER_ID_RE,
    MAX_LIMIT,
    ConsumerSpec,
    ConsumerStatus,
    Plan,
    WalletMode,
)
from sidecar.integrations.plan_choice import NoPlan, PlanChoice, choose_plan

PLAN_ATTRIBUTE = "aforo:plan_id"
PRICE_ATTRIBUTE = "aforo:price"  # micros per call
# quotaTimeUnit (with quotaInterval 1) -> the sidecar's calendar window; a 7-day quota
# is a week. Any other interval has no calendar window here and is skipped.
_TIME_UNITS = {"minute": "minute", "hour": "hour", "day": "day", "week": "week", "month": "month"}


class Attribute(msgspec.Struct, frozen=True):
    name: str
    value: str = ""


class ApigeeProduct(msgspec.Struct, frozen=True):
    name: str
    displayName: str | None = None
    quota: str | None = None
    quotaInterval: str | None = None
    quotaTimeUnit: str | None = None
    environments: list[str] | None = None
    attributes: list[Attribute] | None = None


class ProductGrant(msgspec.Struct, frozen=True):
    apiproduct: str
    status: str = "approved"


class Credential(msgspec.Struct, frozen=True):
    consumerKey: str
    status: str = "approved"
    expiresAt: str | int | None = None
    apiProducts: list[ProductGrant] | None = None


class ApigeeApp(msgspec.Struct, frozen=True):
    appId: str
    name: str
    status: str = "approved"
    developerId: str | None = None
    credentials: list[Credential] | None = None
    attributes: list[Attribute] | None = None


class ApigeeDeveloper(msgspec.Struct, frozen=True):
    email: str
    developerId: str | None = None
    status: str = "active"


class ApigeeSnapshot(msgspec.Struct, frozen=True):
    """Everything one walk of the Management API read (complete: a partial walk is
    never mapped)."""

    products: list[ApigeeProduct]
    apps: list[ApigeeApp]
    developers: list[ApigeeDeveloper]


class ApigeeMapping(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An Apigee connection's mapping options."""

    # "x": Apigee X / hybrid (apigee.googleapis.com/v1); "edge": Apigee Edge (/v1).
    api: Literal["x", "edge"] = "x"
    # What the shared flow sends as the consumer: developer.app.id (its default) or the
    # app's name (developer.app.name).
    consumer_field: Literal["appId", "name"] = "appId"
    products: dict[str, PlanChoice] = {}
    # An app granted several products is bound to the plan of the first of them listed
    # here, else to the product whose name sorts first.
    product_priority: list[str] = []
    # The wallet of the consumers an import creates (None: prepaid, the admin API's
    # default); an existing consumer's wallet is never changed by an import.
    wallet_mode: WalletMode | None = None
    # The plan of apps granted no mapped product; None: such apps are skipped.
    default_plan_id: str | None = None
    # Push a consumer's suspension or revocation to Apigee (the app's status).
    push_status: bool = False
    page_size: int = 1000  # objects per Management API page (2-1000)

    def validated(self) -> ApigeeMapping:
        # A startKey page begins with the previous page's last object: pages of one
        # would never move on.
        if not 2 <= self.page_size <= 1000:
            raise ValueError("page_size must be between 2 and 1000")
        return self


def _attribute(attributes: list[Attribute] | None, name: str) -> str | None:
    return next((a.value for a in attributes or () if a.name == name), None)


def _quota(product: ApigeeProduct, skipped: list[Skipped]) -> dict[str, int]:
    """The product's quota as one window ({} when it sets none)."""
    if not product.quota:
        return {}
    unit = (product.quotaTimeUnit or "").lower()
    interval = (product.quotaInterval or "1").strip()
    if not digits(product.quota.strip()) or not digits(interval):
        skipped.append(Skipped("limit", product.name, f"quota {product.quota!r} is not a whole number"))
        return {}
    limit = int(product.quota)
    window = (
        _TIME_UNITS.get(unit) if interval == "1" else "week" if (unit, interval) == ("day", "7") else None
    )
    if window is None:
        skipped.append(
            Skipped("limit", product.name, f"a quota per {interval} {unit} is not a calendar window")
        )
        return {}
    if limit > MAX_LIMIT:
        skipped.append(Skipped("limit", product.name, f"quota {limit} is above {MAX_LIMIT}"))
        return {}
    return {window: limit}


def _plans(
    snapshot: ApigeeSnapshot,
    mapping: ApigeeMapping,
    environments: list[str],
    tenant: str,
    skipped: list[Skipped],
) -> tuple[dict[str, Plan], dict[str, str]]:
    plans: dict[str, Plan] = {}
    plan_of_product: dict[str, str] = {}
    for product in sorted(snapshot.products, key=lambda p: p.name):
        if environments and product.environments and not set(product.environments) & set(environments):
            skipped.append(Skipped("plan", product.name, "in none of the connection's environments"))
            continue
        option = mapping.products.get(product.name, PlanChoice())
        marks = (
            _attribute(product.attributes, PLAN_ATTRIBUTE),
            _attribute(product.attributes, PRICE_ATTRIBUTE),
        )
        try:
            plan_id, price = choose_plan(option, *marks, product.name)
        except NoPlan as exc:
            skipped.append(Skipped("plan", product.name, str(exc)))
            continue
        plan = Plan(
            id=plan_id,
            tenant=tenant,
            windows=_quota(product, skipped),
            price=price,
            name=product.displayName or product.name,
        )
        held = plans.get(plan_id)
        if held is not None and (held.windows, held.price) != (plan.windows, plan.price):
            # Several products naming one plan must agree; the first by name defines it.
            skipped.append(
                Skipped(
                    "plan", product.name, f"plan {plan_id!r} is defined by another product with other terms"
                )
            )
            continue
        plans.setdefault(plan_id, plan)
        plan_of_product[product.name] = plan_id
    return plans, plan_of_product


def _usable(credential: Credential, now_ms: int) -> bool:
    text = str(credential.expiresAt if credential.expiresAt is not None else -1)
    expires = int(text) if digits(text.lstrip("-")) else -1  # absent or unreadable: never
    return credential.status == "approved" and (expires < 0 or expires > now_ms)


def map_catalog(
    snapshot: ApigeeSnapshot, mapping: ApigeeMapping, environments: list[str], tenant: str, now_ms: int
) -> Mapped:
    """``environments``: the connection's (empty: all); ``now_ms`` decides which
    credentials have expired."""
    skipped: list[Skipped] = []
    plans, plan_of_product = _plans(snapshot, mapping, environments, tenant, skipped)
    rank = {name: i for i, name in enumerate(mapping.product_priority)}
    inactive = {d.developerId for d in snapshot.developers if d.status != "active" and d.developerId}
    consumers: dict[str, ConsumerSpec] = {}
    keys: dict[str, set[str]] = {}
    for app in sorted(snapshot.apps, key=lambda a: a.appId):
        consumer_id = getattr(app, mapping.consumer_field)
        if not CONSUMER_ID_RE.fullmatch(consumer_id) or consumer_id in consumers:
            reason = "is taken by another app" if consumer_id in consumers else "is not valid"
            skipped.append(
                Skipped("consumer", app.appId, f"{mapping.consumer_field} {consumer_id!r} {reason}")
            )
            continue
        usable = [c for c in app.credentials or () if _usable(c, now_ms)]
        granted = sorted(
            {
                grant.apiproduct
                for credential in usable
                for grant in credential.apiProducts or ()
                if grant.status == "approved" and grant.apiproduct in plan_of_product
            },
            key=lambda name: (rank.get(name, len(rank)), name),
        )
        plan_id = plan_of_product[granted[0]] if granted else mapping.default_plan_id
        if plan_id is None:
            skipped.append(
                Skipped("consumer", consumer_id, "granted no mapped API product, and no default_plan_id")
            )
            continue
        for other in granted[1:]:
            if plan_of_product[other] != plan_id:
                skipped.append(
                    Skipped(
                        "binding", f"{consumer_id}/{other}", f"bound to plan {plan_id!r} of {granted[0]!r}"
                    )
                )
        revoked = app.status != "approved" or app.developerId in inactive
        status = ConsumerStatus.REVOKED if revoked else ConsumerStatus.ACTIVE
        consumers[consumer_id] = ConsumerSpec(
            id=consumer_id, plan_id=plan_id, tenant=tenant, wallet_mode=mapping.wallet_mode, status=status
        )
        hashes = {hash_api_key(c.consumerKey) for c in usable if c.consumerKey}
        if hashes:  # kept while the app is revoked: the consumer's status denies them
            keys[consumer_id] = hashes
    return Mapped(
        Catalog(plans=plans, consumers=consumers, keys={c: frozenset(k) for c, k in keys.items()}),
        skipped,
    )


class NoQuotaWindow(ValueError):
    """Limits an Apigee product's single quota cannot express."""


def quota_fields(windows: dict[str, int]) -> dict[str, str]:
    """One window's limit as an API product's quota fields (the inverse of the import):
    ``{"quota", "quotaInterval", "quotaTimeUnit"}``."""
    if len(windows) != 1:
        raise NoQuotaWindow(f"an API product holds one quota; {len(windows)} windows given: name one")
    ((window, limit),) = windows.items()
    interval, unit = ("7", "day") if window == "week" else ("1", window)
    if unit not in _TIME_UNITS:
        raise NoQuotaWindow(f"no such window {window!r}")
    return {"quota": str(limit), "quotaInterval": interval, "quotaTimeUnit": unit}
