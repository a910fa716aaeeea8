"""Kong's catalog as the sidecar's: consumer groups become plans, consumers become
consumers bound to their group's plan, key-auth credentials become registered keys.
Pure: the objects the Admin API returned in, a catalog (and what was skipped, and why)
out. The README's "Kong import mapping" table states the same rules.

Object shapes: Kong Gateway Admin API reference, entities Consumer, Consumer Group,
Plugin (rate-limiting, rate-limiting-advanced) and Key Auth credential
(https://developer.konghq.com/api/gateway/admin-ee/).
"""

from __future__ import annotations

from typing import Literal

import msgspec

from sidecar.core.api_keys import hash_api_key
from sidecar.core.catalog_diff import Catalog, Mapped, Skipped
from sidecar.core.models import CONSUMER_ID_RE, PRODUCT_RE, ConsumerSpec, Plan, WalletMode
from sidecar.integrations.plan_choice import NoPlan, PlanChoice, choose_plan

PLAN_TAG = "aforo:plan_id="
PRICE_TAG = "aforo:price="
# rate-limiting's config names the windows it limits; second and year have no window here.
_RATE_LIMITING_WINDOWS = {"minute": "minute", "hour": "hour", "day": "day", "month": "month"}
# rate-limiting-advanced gives window sizes in seconds; only these are calendar windows.
_WINDOW_SECONDS = {60: "minute", 3600: "hour", 86400: "day", 604800: "week"}


class Ref(msgspec.Struct, frozen=True):
    id: str


class KongConsumer(msgspec.Struct, frozen=True):
    id: str
    username: str | None = None
    custom_id: str | None = None
    tags: list[str] | None = None


class KongGroup(msgspec.Struct, frozen=True):
    id: str
    name: str
    tags: list[str] | None = None


class KongPlugin(msgspec.Struct, frozen=True):
    id: str
    name: str
    config: dict[str, object] = {}
    enabled: bool = True
    consumer_group: Ref | None = None
    service: Ref | None = None
    route: Ref | None = None


class KongEntity(msgspec.Struct, frozen=True):
    """A service or a route: what the plugin names a call's product after."""

    id: str
    name: str | None = None


class KongKeyAuth(msgspec.Struct, frozen=True):
    id: str
    key: str
    consumer: Ref


class KongSnapshot(msgspec.Struct, frozen=True):
    """Everything one walk of the Admin API read (complete: a partial walk is never
    mapped). ``members`` maps a group id to its consumer ids."""

    consumers: list[KongConsumer]
    groups: list[KongGroup]
    members: dict[str, list[str]]
    plugins: list[KongPlugin]
    keys: list[KongKeyAuth]
    services: list[KongEntity] = []
    routes: list[KongEntity] = []


class KongMapping(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A connection's mapping options."""

    consumer_field: Literal["id", "custom_id", "username"] = "id"
    groups: dict[str, PlanChoice] = {}
    # A consumer in several groups is bound to the first of them listed here, else to
    # the group whose name sorts first.
    group_priority: list[str] = []
    # The wallet of the consumers an import creates (None: prepaid, the admin API's
    # default); an existing consumer's wallet is never changed by an import.
    wallet_mode: WalletMode | None = None
    # The plan of consumers in no group; None: such consumers are skipped.
    default_plan_id: str | None = None
    # Push a consumer's suspension or revocation to Kong: the consumer joins the ACL
    # group ``deny_group`` (and leaves it on resume).
    push_status: bool = False
    deny_group: str = "aforo-denied"


def _tag(tags: list[str] | None, prefix: str) -> str | None:
    for tag in tags or ():
        if tag.startswith(prefix):
            return tag[len(prefix) :]
    return None


def _limits(plugins: list[KongPlugin], skipped: list[Skipped], group: KongGroup) -> dict[str, int]:
    """The windows a group's rate limiting plugins set; the stricter one wins."""
    windows: dict[str, int] = {}

    def limit(window: str, value: object) -> None:
        if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
            windows[window] = min(int(value), windows.get(window, int(value)))

    for plugin in plugins:
        if not plugin.enabled or plugin.consumer_group is None or plugin.consumer_group.id != group.id:
            continue
        if plugin.name == "rate-limiting":
            for name, value in plugin.config.items():
                if name in _RATE_LIMITING_WINDOWS and value is not None:
                    limit(_RATE_LIMITING_WINDOWS[name], value)
                elif name in ("second", "year") and value is not None:
                    skipped.append(Skipped("limit", f"{group.name}/{name}", "no such window in the sidecar"))
        elif plugin.name == "rate-limiting-advanced":
            limits = plugin.config.get("limit") or []
            sizes = plugin.config.get("window_size") or []
            for value, size in zip(limits, sizes, strict=False):  # type: ignore[call-overload]
                window = _WINDOW_SECONDS.get(size)
                if window is None:
                    skipped.append(
                        Skipped("limit", f"{group.name}/{size}s", "window size is not a calendar window")
                    )
                else:
                    limit(window, value)
    return windows


_LIMITING = ("rate-limiting", "rate-limiting-advanced")


def _products(snapshot: KongSnapshot, skipped: list[Skipped], group: KongGroup) -> list[str]:
    """The products a group's plan grants: the names (ids when unnamed, as the plugin
    names a call's product) of the services and routes its limiting plugins are scoped
    to; every product ([]) when one of them is not scoped, or none limits the group."""
    names = {e.id: e.name or e.id for e in (*snapshot.services, *snapshot.routes)}
    products: set[str] = set()
    for plugin in snapshot.plugins:
        if plugin.name not in _LIMITING or not plugin.enabled:
            continue
        if plugin.consumer_group is None or plugin.consumer_group.id != group.id:
            continue
        scope = plugin.service or plugin.route
        if scope is None:
            return []
        product = names.get(scope.id, scope.id)
        if PRODUCT_RE.fullmatch(product):
            products.add(product)
        else:
            skipped.append(Skipped("product", f"{group.name}/{product}", "not a valid product id"))
    return sorted(products)


def map_catalog(snapshot: KongSnapshot, mapping: KongMapping, tenant: str) -> Mapped:
    skipped: list[Skipped] = []
    plans: dict[str, Plan] = {}
    plan_of_group: dict[str, str] = {}
    for group in sorted(snapshot.groups, key=lambda g: g.name):
        option = mapping.groups.get(group.name, PlanChoice())
        try:
            plan_id, price = choose_plan(
                option, _tag(group.tags, PLAN_TAG), _tag(group.tags, PRICE_TAG), group.name
            )
        except NoPlan as exc:
            skipped.append(Skipped("plan", group.name, str(exc)))
            continue
        plans[plan_id] = Plan(
            id=plan_id,
            tenant=tenant,
            windows=_limits(snapshot.plugins, skipped, group),
            price=price,
            products=_products(snapshot, skipped, group),
            name=group.name,
        )
        plan_of_group[group.id] = plan_id
    group_name = {g.id: g.name for g in snapshot.groups}
    rank = {name: i for i, name in enumerate(mapping.group_priority)}
    groups_of: dict[str, list[str]] = {}
    for group_id, member_ids in snapshot.members.items():
        if group_id in plan_of_group:
            for member in member_ids:
                groups_of.setdefault(member, []).append(group_id)

    consumers: dict[str, ConsumerSpec] = {}
    consumer_id_of: dict[str, str] = {}
    for consumer in snapshot.consumers:
        consumer_id = getattr(consumer, mapping.consumer_field)
        if not consumer_id or not CONSUMER_ID_RE.fullmatch(consumer_id):
            skipped.append(
                Skipped("consumer", consumer.id, f"{mapping.consumer_field} {consumer_id!r} is not valid")
            )
            continue
        joined = sorted(
            groups_of.get(consumer.id, []), key=lambda g: (rank.get(group_name[g], len(rank)), group_name[g])
        )
        plan_id = plan_of_group[joined[0]] if joined else mapping.default_plan_id
        if plan_id is None:
            skipped.append(
                Skipped("consumer", consumer_id, "in no mapped consumer group, and no default_plan_id")
            )
            continue
        consumers[consumer_id] = ConsumerSpec(
            id=consumer_id, plan_id=plan_id, tenant=tenant, wallet_mode=mapping.wallet_mode
        )
        consumer_id_of[consumer.id] = consumer_id

    keys: dict[str, set[str]] = {}
    for credential in snapshot.keys:
        owner = consumer_id_of.get(credential.consumer.id)
        if owner is None:
            skipped.append(Skipped("key", credential.id, "its consumer is not imported"))
            continue
        keys.setdefault(owner, set()).add(hash_api_key(credential.key))
    return Mapped(
        Catalog(plans=plans, consumers=consumers, keys={c: frozenset(k) for c, k in keys.items()}),
        skipped,
    )


class UnsupportedWindow(ValueError):
    """A window Kong's rate-limiting plugin has no field for."""


def rate_limiting_config(windows: dict[str, int]) -> dict[str, int]:
    """A plan's windows as the config of Kong's ``rate-limiting`` plugin (the inverse of
    the import; ``week`` has no field there)."""
    config = {}
    for window, limit in sorted(windows.items()):
        if window not in _RATE_LIMITING_WINDOWS:
            raise UnsupportedWindow(f"Kong's rate-limiting plugin has no {window!r} window")
        config[window] = limit
    return config
