"""The sandbox's in-memory world: keys, their spend windows, and what they may do. No HTTP here.

Every operation is synchronous, so under one event loop each is atomic. Time comes from an injected
clock so tests can cross a day, a week or a month.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Final

from broker.sandbox.wire import ApiError

PAGE_SIZE: Final = 100
LIMIT_RESETS: Final = ("daily", "weekly", "monthly")
_ZERO: Final = Decimal(0)
_MANAGE_URL: Final = "https://openrouter.ai/settings/keys"


def utc_now() -> datetime:
    return datetime.now(UTC)


def _period(window: str, now: datetime) -> str:
    """The id of the UTC day, Monday-started week or calendar month that ``now`` falls in."""
    day = now.astimezone(UTC).date()
    if window == "daily":
        return day.isoformat()
    if window == "weekly":
        return (day - timedelta(days=day.weekday())).isoformat()
    return f"{day.year:04d}-{day.month:02d}"


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat()


@dataclass(frozen=True)
class NewKey:
    """A validated ``POST /keys`` body."""

    name: str
    limit: Decimal | None = None
    limit_reset: str | None = None
    include_byok_in_limit: bool = True
    expires_at: datetime | None = None


@dataclass(frozen=True)
class KeyUpdate:
    """A validated ``PATCH /keys/{hash}`` body; ``set_*`` tells a JSON null from an absent field."""

    name: str | None = None
    disabled: bool | None = None
    include_byok_in_limit: bool | None = None
    set_limit: bool = False
    limit: Decimal | None = None
    set_limit_reset: bool = False
    limit_reset: str | None = None


@dataclass
class SandboxKey:
    hash: str
    secret: str = field(repr=False)
    name: str
    limit: Decimal | None
    limit_reset: str | None
    include_byok_in_limit: bool
    created_at: datetime
    expires_at: datetime | None = None
    workspace_id: str = ""
    disabled: bool = False
    deleted: bool = False
    updated_at: datetime | None = None
    usage: Decimal = _ZERO
    windows: dict[str, tuple[str, Decimal]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.secret[:12]}...{self.secret[-3:]}"

    def usage_in(self, window: str | None, now: datetime) -> Decimal:
        """Spend in the current ``window`` (``None`` = lifetime); a stale window counts as zero."""
        if window is None:
            return self.usage
        period, amount = self.windows.get(window, ("", _ZERO))
        return amount if period == _period(window, now) else _ZERO

    def limit_remaining(self, now: datetime) -> Decimal | None:
        if self.limit is None:
            return None
        return self.limit - self.usage_in(self.limit_reset, now)

    def add_usage(self, cost: Decimal, now: datetime) -> None:
        self.usage += cost
        for window in LIMIT_RESETS:
            self.windows[window] = (_period(window, now), self.usage_in(window, now) + cost)

    def is_expired(self, now: datetime) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def usage_json(self, now: datetime) -> dict[str, object]:
        """The limit and spend fields shared by the key object and ``GET /key``."""
        return {
            "limit": self.limit,
            "limit_remaining": self.limit_remaining(now),
            "limit_reset": self.limit_reset,
            "include_byok_in_limit": self.include_byok_in_limit,
            "usage": self.usage,
            "usage_daily": self.usage_in("daily", now),
            "usage_weekly": self.usage_in("weekly", now),
            "usage_monthly": self.usage_in("monthly", now),
            "byok_usage": _ZERO,
            "byok_usage_daily": _ZERO,
            "byok_usage_weekly": _ZERO,
            "byok_usage_monthly": _ZERO,
        }

    def to_json(self, now: datetime) -> dict[str, object]:
        """The Key object of the real API (never the secret)."""
        return {
            "hash": self.hash,
            "name": self.name,
            "label": self.label,
            "disabled": self.disabled,
            **self.usage_json(now),
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "expires_at": _iso(self.expires_at),
            "creator_user_id": None,
            "workspace_id": self.workspace_id,
        }


class SandboxState:
    """All keys the sandbox ever issued, deleted ones included (they are only marked)."""

    def __init__(self, clock: Callable[[], datetime] | None = None) -> None:
        self._clock = clock or utc_now
        self.workspace_id = str(uuid.uuid4())
        self._keys: dict[str, SandboxKey] = {}
        self._by_secret: dict[str, str] = {}

    def now(self) -> datetime:
        moment = self._clock()
        if moment.tzinfo is None:
            raise ValueError("the sandbox clock must return aware datetimes")
        return moment.astimezone(UTC)

    def create_key(self, new: NewKey) -> SandboxKey:
        secret = "sk-or-v1-" + secrets.token_hex(32)
        key = SandboxKey(
            hash=hashlib.sha256(secret.encode()).hexdigest(),
            secret=secret,
            name=new.name,
            limit=new.limit,
            limit_reset=new.limit_reset,
            include_byok_in_limit=new.include_byok_in_limit,
            created_at=self.now(),
            expires_at=new.expires_at,
            workspace_id=self.workspace_id,
        )
        self._keys[key.hash] = key
        self._by_secret[secret] = key.hash
        return key

    def get_key(self, key_hash: str) -> SandboxKey:
        key = self._keys.get(key_hash)
        if key is None or key.deleted:
            raise ApiError(404, "Key not found")
        return key

    def update_key(self, key_hash: str, update: KeyUpdate) -> SandboxKey:
        key = self.get_key(key_hash)
        if update.name is not None:
            key.name = update.name
        if update.disabled is not None:
            key.disabled = update.disabled
        if update.include_byok_in_limit is not None:
            key.include_byok_in_limit = update.include_byok_in_limit
        if update.set_limit:
            key.limit = update.limit
        if update.set_limit_reset:
            key.limit_reset = update.limit_reset
        key.updated_at = self.now()
        return key

    def delete_key(self, key_hash: str) -> None:
        key = self.get_key(key_hash)
        key.deleted = True
        key.updated_at = self.now()

    def list_keys(self, *, offset: int = 0, include_disabled: bool = False) -> list[SandboxKey]:
        """One page of live keys, most recently created first."""
        live = [
            key
            for key in reversed(self._keys.values())
            if not key.deleted and (include_disabled or not key.disabled)
        ]
        return live[offset : offset + PAGE_SIZE]

    def all_keys(self) -> list[SandboxKey]:
        """Every key ever created, deleted ones included, oldest first (for tests)."""
        return list(self._keys.values())

    def total_usage(self) -> Decimal:
        return sum((key.usage for key in self._keys.values()), _ZERO)

    def key_for_secret(self, secret: str) -> SandboxKey | None:
        """The live key behind ``secret``, or ``None`` when unknown or deleted."""
        key_hash = self._by_secret.get(secret)
        key = None if key_hash is None else self._keys[key_hash]
        return None if key is None or key.deleted else key

    def inference_key(self, secret: str) -> SandboxKey:
        """The key that may call a model: 401 when unknown, deleted, disabled or expired."""
        key = self.key_for_secret(secret)
        if key is None or key.disabled or key.is_expired(self.now()):
            raise ApiError(401, "User not found.")
        return key

    def check_limit(self, key: SandboxKey) -> None:
        """403 once the spend in the key's window has reached its limit (checked before a call)."""
        if key.limit is None:
            return
        now = self.now()
        if key.usage_in(key.limit_reset, now) >= key.limit:
            window = key.limit_reset or "total"
            raise ApiError(403, f"Key limit exceeded ({window} limit). Manage it using {_MANAGE_URL}")

    def charge(self, key: SandboxKey, cost: Decimal) -> None:
        key.add_usage(cost, self.now())
