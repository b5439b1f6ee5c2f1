"""Request validation: every rule that turns bad input into INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import re
import uuid
from datetime import date, timedelta
from decimal import Decimal

from google.protobuf import duration_pb2

from broker.errors import InvalidArgument
from broker.money import MoneyFormatError, parse_usd

USER_ID = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")
REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,200}$")
TIER_NAME = re.compile(r"^[a-z0-9_]{1,32}$")
MONTH = re.compile(r"([0-9]{4})-([0-9]{2})")
DAY = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})")
MAX_TOKENS = 10**12
MAX_TEXT = 200
MAX_CALL_DURATION = timedelta(hours=24)
MAX_GRACE = timedelta(days=30)


def user_id(value: str, field: str = "user_id") -> str:
    if not value:
        raise InvalidArgument(field, "is required")
    if not USER_ID.fullmatch(value):
        raise InvalidArgument(field, "must be 1-128 characters of A-Z a-z 0-9 . _ : @ -")
    return value


def request_id(value: str, field: str = "request_id", required: bool = True) -> str | None:
    if not value:
        if required:
            raise InvalidArgument(field, "is required")
        return None
    if not REQUEST_ID.fullmatch(value):
        raise InvalidArgument(field, "must be 1-200 printable ASCII characters without spaces")
    return value


def reservation_id(value: str, field: str = "reservation_id", required: bool = False) -> uuid.UUID | None:
    if not value:
        if required:
            raise InvalidArgument(field, "is required")
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidArgument(field, "must be a reservation id (a UUID) from CheckLimit") from None


def usd(value: str, field: str, *, required: bool = False, positive: bool = False) -> Decimal | None:
    if not value:
        if required:
            raise InvalidArgument(field, "is required")
        return None
    try:
        amount = parse_usd(value)
    except MoneyFormatError as exc:
        raise InvalidArgument(field, str(exc)) from None
    if positive and amount <= 0:
        raise InvalidArgument(field, "must be greater than zero")
    return amount


def text(value: str, field: str) -> str:
    if len(value) > MAX_TEXT:
        raise InvalidArgument(field, f"must be at most {MAX_TEXT} characters")
    if any(not ch.isprintable() for ch in value):
        raise InvalidArgument(field, "must not contain control characters")
    return value


def tokens(value: int, field: str) -> int:
    if value < 0 or value > MAX_TOKENS:
        raise InvalidArgument(field, f"must be between 0 and {MAX_TOKENS}")
    return value


def duration(value: duration_pb2.Duration, field: str, maximum: timedelta) -> timedelta:
    """A protobuf Duration within [0, maximum], checked before conversion (which can overflow)."""
    if value.seconds < 0 or value.nanos < 0 or value.seconds > maximum.total_seconds():
        raise InvalidArgument(field, f"must be between 0 and {maximum}")
    converted = timedelta(seconds=value.seconds, microseconds=value.nanos // 1000)
    if converted > maximum:
        raise InvalidArgument(field, f"must be between 0 and {maximum}")
    return converted


def tier(value: str, field: str = "tier") -> str:
    if not TIER_NAME.fullmatch(value):
        raise InvalidArgument(field, "must be a tier name such as free or standard")
    return value


def month(value: str, field: str = "month") -> date | None:
    if not value:
        return None
    match = MONTH.fullmatch(value)
    if not match or not (2000 <= int(match.group(1)) <= 2999 and 1 <= int(match.group(2)) <= 12):
        raise InvalidArgument(field, "must be a month YYYY-MM between 2000-01 and 2999-12")
    return date(int(match.group(1)), int(match.group(2)), 1)


def day(value: str, field: str = "date") -> date | None:
    """A calendar day "YYYY-MM-DD" (None when empty: the caller's default)."""
    if not value:
        return None
    match = DAY.fullmatch(value)
    try:
        parsed = date(int(match.group(1)), int(match.group(2)), int(match.group(3))) if match else None
    except ValueError:
        parsed = None
    if parsed is None or not 2000 <= parsed.year <= 2999:
        raise InvalidArgument(field, "must be a date YYYY-MM-DD between 2000-01-01 and 2999-12-31")
    return parsed


def key_id(value: str, field: str = "key_id") -> str:
    if not value:
        raise InvalidArgument(field, "is required")
    if len(value) > 128 or not REQUEST_ID.fullmatch(value):
        raise InvalidArgument(field, "must be an OpenRouter key hash (1-128 printable characters)")
    return value


def http_status(value: int, field: str = "http_status") -> int:
    if not 100 <= value <= 599:
        raise InvalidArgument(field, "must be an HTTP status code between 100 and 599")
    return value


def bounded(value: int, field: str, low: int, high: int) -> int:
    if not low <= value <= high:
        raise InvalidArgument(field, f"must be between {low} and {high}")
    return value
