"""Validation of the key-management request bodies and query strings, with the real API's 400s."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from broker.sandbox.state import LIMIT_RESETS, KeyUpdate, NewKey
from broker.sandbox.wire import ApiError


def parse_new_key(body: Mapping[str, Any]) -> NewKey:
    """``POST /keys``: ``name`` required; ``limit``, ``limit_reset``, ``expires_at`` optional."""
    return NewKey(
        name=_name(body.get("name")),
        limit=_limit(body.get("limit")),
        limit_reset=_limit_reset(body.get("limit_reset")),
        include_byok_in_limit=_bool(body, "include_byok_in_limit", default=True),
        expires_at=_expires_at(body.get("expires_at")),
    )


def parse_key_update(body: Mapping[str, Any]) -> KeyUpdate:
    """``PATCH /keys/{hash}``: every field optional; null ``limit``/``limit_reset`` clears it."""
    disabled = body.get("disabled")
    if disabled is not None and not isinstance(disabled, bool):
        raise ApiError(400, "disabled must be a boolean")
    byok = body.get("include_byok_in_limit")
    if byok is not None and not isinstance(byok, bool):
        raise ApiError(400, "include_byok_in_limit must be a boolean")
    if "expires_at" in body:
        raise ApiError(400, "expires_at can only be set when a key is created")
    return KeyUpdate(
        name=_name(body["name"]) if "name" in body else None,
        disabled=disabled,
        include_byok_in_limit=byok,
        set_limit="limit" in body,
        limit=_limit(body.get("limit")),
        set_limit_reset="limit_reset" in body,
        limit_reset=_limit_reset(body.get("limit_reset")),
    )


def parse_list_query(query: Mapping[str, str]) -> tuple[int, bool]:
    """``GET /keys`` query: ``offset`` (int ≥ 0) and ``include_disabled`` ("true"/"false")."""
    raw_offset = query.get("offset", "0")
    if not raw_offset.isdigit():
        raise ApiError(400, "offset must be a non-negative integer")
    flag = query.get("include_disabled", "false").lower()
    if flag not in ("true", "false"):
        raise ApiError(400, "include_disabled must be true or false")
    return int(raw_offset), flag == "true"


def _name(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ApiError(400, "name is required and must be a non-empty string")
    return value


def _limit(value: object) -> Decimal | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        raise ApiError(400, "limit must be a number or null")
    amount = Decimal(value)
    if amount < 0:
        raise ApiError(400, "limit must not be negative")
    return amount


def _limit_reset(value: object) -> str | None:
    if value is None:
        return None
    if value not in LIMIT_RESETS:
        raise ApiError(400, "limit_reset must be daily, weekly, monthly or null")
    return str(value)


def _bool(body: Mapping[str, Any], name: str, *, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be a boolean")
    return value


def _expires_at(value: object) -> datetime | None:
    """ISO-8601 in UTC with a ``Z`` and seconds, as the real API demands."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.endswith("Z") or value.count(":") < 2:
        raise ApiError(400, "expires_at must be an ISO-8601 UTC time ending in Z, with seconds")
    try:
        moment = datetime.fromisoformat(value[:-1])
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is not None:
        raise ApiError(400, "expires_at must be an ISO-8601 UTC time ending in Z")
    return moment.replace(tzinfo=UTC)
