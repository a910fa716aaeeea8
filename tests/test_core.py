"""The pure core: money conversion, the decision rule's order, how outcomes are shown."""

from __future__ import annotations

from decimal import Decimal

import pytest

from sidecar.core.decision import DecisionPolicy, evaluate, present, unavailable
from sidecar.core.errors import InvalidInput
from sidecar.core.models import AuthorizeRequest, ConsumerState, ConsumerStatus, Outcome, Plan, WalletMode
from sidecar.core.money import MAX_MICROS, MoneyError, format_micros, to_micros
from sidecar.core.reasons import HTTP_STATUS, Reason


@pytest.mark.parametrize(
    ("amount", "micros"),
    [
        (Decimal("0.05"), 50_000),
        (Decimal("10"), 10_000_000),
        (Decimal("0.000001"), 1),
        ("123.456789", 123_456_789),
        (0, 0),
    ],
)
def test_amounts_convert_to_micros_exactly(amount, micros):
    assert to_micros(amount) == micros
    assert to_micros(format_micros(micros)) == micros


@pytest.mark.parametrize(
    ("amount", "message"),
    [
        (Decimal("0.0000001"), "more than 6 decimal places"),
        (Decimal("-0.01"), "must not be negative"),
        (Decimal("NaN"), "finite"),
        (Decimal("Infinity"), "finite"),
        ("abc", "not a number"),
        (Decimal(MAX_MICROS) + 1, "exceeds the maximum"),
    ],
)
def test_inexact_or_out_of_range_amounts_are_refused(amount, message):
    with pytest.raises(MoneyError, match=message):
        to_micros(amount)


def test_format_micros_prints_plainly():
    assert format_micros(9_950_000) == "9.95"
    assert format_micros(10_000_000) == "10"
    assert format_micros(-50_000) == "-0.05"
    assert format_micros(1) == "0.000001"


def _state(**overrides) -> ConsumerState:
    values = {
        "status": ConsumerStatus.ACTIVE,
        "plan_id": "p",
        "limits": (None, None, 10, None, None),
        "price": 100,
        "products": (),
        "wallet_mode": WalletMode.PREPAID,
        "base": 1_000,
        "pending": 0,
    }
    values.update(overrides)
    return ConsumerState(**values)


def _evaluate(state, *, key_refusal=None, product="api", cost=None, used=(0, 0, 0, 0, 0)):
    return evaluate(
        state,
        key_refusal=key_refusal,
        product=product,
        cost=cost,
        hits=1,
        used=used,
        resets_ms=(1, 2, 3, 4, 5),
    )


def test_the_rule_checks_in_a_fixed_order():
    # Each case fails every later check too: the first failing check names the reason.
    broke = {"base": 0, "used": (0, 0, 10, 0, 0)}
    assert _evaluate(None).reason is Reason.UNKNOWN_CONSUMER
    suspended = _state(status=ConsumerStatus.SUSPENDED, products=("other",), base=0)
    assert _evaluate(None, key_refusal=Reason.INVALID_KEY).reason is Reason.INVALID_KEY
    for refusal in (Reason.INVALID_KEY, Reason.KEY_EXPIRED, Reason.SCOPE_DENIED):
        assert _evaluate(suspended, key_refusal=refusal).reason is refusal
    assert _evaluate(suspended).reason is Reason.SUSPENDED
    revoked = _state(status=ConsumerStatus.REVOKED, base=0)
    assert _evaluate(revoked).reason is Reason.REVOKED
    other = _state(products=("other",), base=0)
    assert _evaluate(other, used=broke["used"]).reason is Reason.PRODUCT_NOT_ALLOWED
    exhausted = _evaluate(_state(base=0), used=broke["used"])
    assert (exhausted.reason, exhausted.retry_at_ms) == (Reason.QUOTA_EXCEEDED, 3)
    assert _evaluate(_state(base=99)).reason is Reason.INSUFFICIENT_BALANCE
    allowed = _evaluate(_state(base=100))
    assert (allowed.reason, allowed.charged) == (Reason.OK, 100)


def test_cost_zero_is_free_and_postpaid_is_never_refused_for_money():
    assert _evaluate(_state(base=0), cost=0) == (Reason.OK, 0, 0)
    owed = _evaluate(_state(base=0, pending=5_000, wallet_mode=WalletMode.POSTPAID), cost=700)
    assert (owed.reason, owed.charged) == (Reason.OK, 700)


def test_every_reason_has_a_status():
    assert set(HTTP_STATUS) == set(Reason)
    assert HTTP_STATUS[Reason.QUOTA_EXCEEDED] == 429
    assert HTTP_STATUS[Reason.INSUFFICIENT_BALANCE] == 402
    assert {HTTP_STATUS[r] for r in (Reason.SUSPENDED, Reason.REVOKED, Reason.UNKNOWN_CONSUMER)} == {403}


def _present(reason: str, retry_at_ms: int = 0, policy: DecisionPolicy | None = None):
    outcome = Outcome(
        reason, 0, 5, "d1", retry_at_ms, (None, 3, None, None, None), (None, 5, None, None, None)
    )
    return present(
        outcome,
        tenant="t",
        consumer_id="c",
        product="api",
        request_id="r",
        now_ms=10_000,
        resets_ms=(60_000, 3_600_000, 0, 0, 0),
        policy=policy or DecisionPolicy(deny_ttl_seconds=7, quota_ttl_cap_seconds=30),
    )


def test_allow_is_never_reusable_and_denials_are_for_a_while():
    allowed = _present("ok")
    assert (allowed.allow, allowed.status, allowed.ttl_seconds, allowed.retry_after) == (True, 200, 0, None)
    assert [(w.window, w.limit, w.remaining, w.reset) for w in allowed.windows] == [("hour", 5, 2, 3600)]
    suspended = _present("suspended")
    assert (suspended.status, suspended.ttl_seconds) == (403, 7)
    quota = _present("quota_exceeded", retry_at_ms=25_001)
    assert (quota.status, quota.retry_after, quota.ttl_seconds) == (429, 16, 16)  # ceil(15.001)
    long_wait = _present("quota_exceeded", retry_at_ms=3_600_000)
    assert (long_wait.retry_after, long_wait.ttl_seconds) == (3590, 30)


def test_unavailable_follows_the_fail_mode():
    kwargs = {"tenant": "t", "consumer_id": "c", "product": "p", "request_id": "r", "decision_id": "d"}
    open_ = unavailable(fail_open=True, **kwargs)
    closed = unavailable(fail_open=False, **kwargs)
    assert (open_.allow, open_.status, open_.degraded, open_.reason) == (True, 200, True, "store_unavailable")
    assert (closed.allow, closed.status, closed.retry_after) == (False, 503, 1)


@pytest.mark.parametrize(
    ("fields", "code", "field"),
    [
        ({}, "missing_consumer", "consumer_id"),
        ({"consumer_id": "a", "api_key": "ak_12345678"}, "missing_consumer", "consumer_id"),
        ({"consumer_id": "a{b}"}, "invalid_identifier", "consumer_id"),
        ({"consumer_id": "a", "tenant": "t:1"}, "invalid_identifier", "tenant"),
        ({"consumer_id": "a", "cost": -1}, "invalid_amount", "cost"),
        ({"consumer_id": "a", "cost": MAX_MICROS + 1}, "invalid_amount", "cost"),
        ({"consumer_id": "a", "hits": 0}, "invalid_request", "hits"),
        ({"consumer_id": "a", "request_id": "has space"}, "invalid_identifier", "request_id"),
        ({"api_key": "short"}, "invalid_key", "api_key"),
    ],
)
def test_authorize_requests_are_validated(fields, code, field):
    with pytest.raises(InvalidInput) as caught:
        AuthorizeRequest(product="api", **fields).validated()
    assert (caught.value.code, caught.value.field) == (code, field)


def test_plans_are_validated():
    with pytest.raises(InvalidInput) as caught:
        Plan(id="p", windows={"fortnight": 1}).validated()
    assert (caught.value.code, caught.value.field) == ("unknown_window", "windows.fortnight")
    with pytest.raises(InvalidInput, match="limit"):
        Plan(id="p", windows={"day": -1}).validated()
    with pytest.raises(InvalidInput, match="price"):
        Plan(id="p", price=-5).validated()
    assert Plan(id="p", windows={"week": 3, "minute": 1}).validated().limits() == (1, None, None, 3, None)
