"""Exact money: decimal strings of US dollars on the wire, Decimal in Python, NUMERIC in SQL."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

MAX_INTEGER_DIGITS = 12
MAX_FRACTION_DIGITS = 10


class MoneyFormatError(ValueError):
    """The text is not an acceptable amount; the message says why (no field name)."""


def parse_usd(text: str) -> Decimal:
    """Parse a non-negative decimal string such as "12.5" or "0.000123".

    Refuses signs, exponents, NaN/Infinity, whitespace and more digits than NUMERIC(22,10) holds,
    so every accepted amount is stored exactly.
    """
    if not text or len(text) > MAX_INTEGER_DIGITS + MAX_FRACTION_DIGITS + 1:
        raise MoneyFormatError("must be a decimal number of US dollars such as 12.5")
    integer, dot, fraction = text.partition(".")
    if not (integer.isascii() and integer.isdigit()) or (
        dot and not (fraction.isascii() and fraction.isdigit())
    ):
        raise MoneyFormatError("must be a plain decimal number such as 12.5 (no sign or exponent)")
    if len(integer) > MAX_INTEGER_DIGITS:
        raise MoneyFormatError(f"must have at most {MAX_INTEGER_DIGITS} digits before the point")
    if len(fraction) > MAX_FRACTION_DIGITS:
        raise MoneyFormatError(f"must have at most {MAX_FRACTION_DIGITS} digits after the point")
    try:
        return Decimal(text)
    except InvalidOperation:  # pragma: no cover - the checks above rule it out
        raise MoneyFormatError("must be a decimal number") from None


def format_usd(amount: Decimal | None) -> str:
    """Shortest exact decimal string: Decimal('10.0000000000') -> '10'; None -> ''."""
    if amount is None:
        return ""
    if amount == 0:
        return "0"
    text = format(amount.normalize(), "f")
    return text
