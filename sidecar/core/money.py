"""Money as integer micro-units (1 currency unit == 1_000_000 micros).

Floats never touch a balance. Decimal amounts from the outside (the Apigee seed
contract sends ``estimatedCost: 0.05``) are converted exactly or refused.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

MICROS_PER_UNIT = 1_000_000
# Redis' Lua numbers are IEEE doubles: every integer up to 2**53 is exact, so no
# balance, price or cost may go beyond it.
MAX_MICROS = 2**53 - 1


class MoneyError(ValueError):
    """A monetary amount that cannot be represented exactly."""


def to_micros(amount: Decimal | int | str) -> int:
    """Convert a currency amount to micro-units exactly; raise ``MoneyError`` otherwise."""
    try:
        value = Decimal(amount)
    except (InvalidOperation, TypeError, ValueError):
        raise MoneyError(f"not a number: {amount!r}") from None
    if not value.is_finite():
        raise MoneyError("amount must be finite")
    micros = value * MICROS_PER_UNIT
    if micros != micros.to_integral_value():
        raise MoneyError("amount has more than 6 decimal places")
    result = int(micros)
    check_micros(result)
    return result


def check_micros(value: int, *, allow_negative: bool = False) -> int:
    """Validate an integer micro amount against the exact range; return it."""
    if not allow_negative and value < 0:
        raise MoneyError("amount must not be negative")
    if abs(value) > MAX_MICROS:
        raise MoneyError(f"amount exceeds the maximum of {MAX_MICROS} micros")
    return value


def format_micros(micros: int) -> str:
    """The exact decimal text of ``micros`` in currency units: 9950000 -> "9.95",
    10000000 -> "10", -50000 -> "-0.05". Also a valid JSON number."""
    sign = "-" if micros < 0 else ""
    units, fraction = divmod(abs(micros), MICROS_PER_UNIT)
    if not fraction:
        return f"{sign}{units}"
    return f"{sign}{units}.{fraction:06d}".rstrip("0")
