"""Which plan a gateway object (a Kong consumer group, an Apigee API product) becomes,
and at what price: the connection's mapping first, then a mark on the object itself
(a tag or a custom attribute), then a default. Pure; shared by every gateway's mapping."""

from __future__ import annotations

import msgspec

from sidecar.core.digits import digits
from sidecar.core.models import PLAN_ID_RE
from sidecar.core.money import MAX_MICROS


class PlanChoice(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A connection's mapping of one gateway object (by name) to a plan."""

    plan_id: str | None = None
    price: int | None = None  # micros per call


class NoPlan(ValueError):
    """The object cannot become a plan; the message says why."""


def choose_plan(
    option: PlanChoice, marked_id: str | None, marked_price: str | None, name: str
) -> tuple[str, int]:
    """``(plan id, price)``: the option's, else the object's marks (``marked_price`` in
    micros, digits only), else the object's ``name`` and 0. NoPlan when the id breaks the
    plan id rule or the price is out of range."""
    plan_id = option.plan_id or marked_id or name
    if not PLAN_ID_RE.fullmatch(plan_id):
        raise NoPlan(f"plan id {plan_id!r} is not valid")
    if option.price is not None:
        price = option.price
    else:
        price = int(marked_price) if digits(marked_price or "") else 0
    if not 0 <= price <= MAX_MICROS:
        raise NoPlan("price out of range")
    return plan_id, price
