"""SQL of the key lifecycle: users, their sealed keys, rotations, retirements, listings."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal

import asyncpg

from broker.db import Database
from broker.storage import intents_store
from broker.storage.audit_writes import AuditEvent, insert_audit
from broker.storage.events_store import key_event
from broker.storage.intents_store import Intent

_KEY_INFO = """
    SELECT u.user_id, u.tier, u.custom_limit_usd,
           coalesce(u.custom_limit_usd, t.monthly_limit_usd) AS limit_usd,
           u.disabled, u.create_time, k.key_id, k.key_version, k.status, k.provider_name,
           k.create_time AS rotate_time, k.limit_base_usd, k.limit_base_period,
           coalesce(p.spent_usd, 0) AS spent_usd, coalesce(p.reserved_usd, 0) AS reserved_usd,
           coalesce(u.custom_requests_per_minute, t.requests_per_minute) AS requests_per_minute
    FROM users u
    JOIN tiers t ON t.name = u.tier
    JOIN api_keys k ON k.user_id = u.user_id AND k.key_version = u.current_key_version
    LEFT JOIN usage_periods p ON p.user_id = u.user_id AND p.period_start = $1
"""


@dataclass(frozen=True)
class UserKey:
    """A user's settings and current key, with this month's spend. Never the secret."""

    user_id: str
    tier: str
    custom_limit_usd: Decimal | None
    limit_usd: Decimal | None
    disabled: bool
    create_time: datetime
    key_id: str
    key_version: int
    status: str  # active | revoked (of the current key)
    provider_name: str
    rotate_time: datetime
    limit_base_usd: Decimal
    limit_base_period: date
    spent_usd: Decimal
    reserved_usd: Decimal
    requests_per_minute: int | None


@dataclass(frozen=True)
class Disclosure:
    outcome: str  # ok | no_key | disabled | limit
    key_id: str | None
    key_version: int | None
    sealed: bytes | None
    kek_id: str | None
    limit_usd: Decimal | None
    spent_usd: Decimal
    reserved_usd: Decimal


@dataclass(frozen=True)
class NewKey:
    """An api_keys row to insert."""

    user_id: str
    key_version: int
    key_id: str
    provider_name: str
    sealed: bytes
    kek_id: str
    request_id: str | None
    limit_base_usd: Decimal
    limit_base_period: date
    create_time: datetime


@dataclass(frozen=True)
class KeyRecord:
    """An api_keys row (for idempotent replays and retirement)."""

    user_id: str
    key_version: int
    key_id: str
    status: str
    create_time: datetime
    retire_at: datetime | None
    retire_delete: bool


async def disclose_key(db: Database, user_id: str, period: date, now: datetime, actor: str) -> Disclosure:
    row = await db.fetchrow(
        "SELECT * FROM kb_get_key($1, $2, $3, $4, $5)", user_id, period, now, actor, uuid.uuid4()
    )
    assert row is not None
    return Disclosure(
        outcome=row["o_outcome"],
        key_id=row["o_key_id"],
        key_version=row["o_key_version"],
        sealed=row["o_sealed"],
        kek_id=row["o_kek_id"],
        limit_usd=row["o_limit"],
        spent_usd=row["o_spent"] or Decimal(0),
        reserved_usd=row["o_reserved"] or Decimal(0),
    )


async def find_user(db: Database, user_id: str, period: date) -> UserKey | None:
    row = await db.fetchrow(_KEY_INFO + " WHERE u.user_id = $2", period, user_id)
    return None if row is None else UserKey(**dict(row))


async def list_users(db: Database, after: str, limit: int, period: date) -> list[UserKey]:
    rows = await db.fetch(
        _KEY_INFO + " WHERE u.user_id > $2 ORDER BY u.user_id LIMIT $3", period, after, limit
    )
    return [UserKey(**dict(row)) for row in rows]


async def find_key_by_request(db: Database, user_id: str, request_id: str) -> KeyRecord | None:
    row = await db.fetchrow(
        """SELECT user_id, key_version, key_id, status, create_time, retire_at, retire_delete
           FROM api_keys WHERE user_id = $1 AND request_id = $2""",
        user_id,
        request_id,
    )
    return None if row is None else KeyRecord(**dict(row))


async def find_key(db: Database, user_id: str, key_version: int) -> KeyRecord | None:
    row = await db.fetchrow(
        """SELECT user_id, key_version, key_id, status, create_time, retire_at, retire_delete
           FROM api_keys WHERE user_id = $1 AND key_version = $2""",
        user_id,
        key_version,
    )
    return None if row is None else KeyRecord(**dict(row))


async def tier_limit(db: Database, tier: str) -> tuple[bool, Decimal | None]:
    """(whether the tier exists, its monthly limit or None when unlimited)."""
    row = await db.fetchrow("SELECT monthly_limit_usd FROM tiers WHERE name = $1", tier)
    return (False, None) if row is None else (True, row["monthly_limit_usd"])


async def insert_user_with_key(
    db: Database,
    key: NewKey,
    tier: str,
    custom_limit: Decimal | None,
    event: AuditEvent,
    intent: Intent,
) -> bool:
    """A new user and their first key. False if the user exists or our intent was taken over."""

    async def insert_user(conn: asyncpg.Connection) -> bool:
        return bool(
            await conn.fetchval(
                """INSERT INTO users (user_id, tier, custom_limit_usd, disabled, current_key_version,
                                      create_time, update_time)
                   VALUES ($1, $2, $3, false, $4, $5, $5)
                   ON CONFLICT (user_id) DO NOTHING RETURNING true""",
                key.user_id,
                tier,
                custom_limit,
                key.key_version,
                key.create_time,
            )
        )

    return await _store_new_key(db, key, intent, event, insert_user, "PROVISIONED")


async def reissue_key(
    db: Database,
    key: NewKey,
    tier: str,
    custom_limit: Decimal | None,
    event: AuditEvent,
    intent: Intent,
) -> bool:
    """A new key for a user whose current key is revoked. False if it is not revoked (any more)."""

    async def point_user_at_key(conn: asyncpg.Connection) -> bool:
        return bool(
            await conn.fetchval(
                """UPDATE users u SET current_key_version = $2, tier = $3, custom_limit_usd = $4,
                                      disabled = false, update_time = $5
                   FROM api_keys k
                   WHERE u.user_id = $1 AND k.user_id = u.user_id
                     AND k.key_version = u.current_key_version AND k.status = 'revoked'
                     AND u.current_key_version = $2 - 1
                   RETURNING true""",
                key.user_id,
                key.key_version,
                tier,
                custom_limit,
                key.create_time,
            )
        )

    return await _store_new_key(db, key, intent, event, point_user_at_key, "PROVISIONED")


async def rotate(
    db: Database,
    key: NewKey,
    retire_at: datetime,
    retire_delete: bool,
    event: AuditEvent,
    intent: Intent,
) -> bool:
    """Make `key` current in place of version key_version - 1, whose retirement is scheduled at
    `retire_at`. False if that is no longer the user's active key or our intent was taken over."""

    async def replace_current(conn: asyncpg.Connection) -> bool:
        moved = await conn.fetchval(
            """UPDATE users SET current_key_version = $2, update_time = $3
               WHERE user_id = $1 AND current_key_version = $2 - 1 RETURNING true""",
            key.user_id,
            key.key_version,
            key.create_time,
        )
        previous = await conn.fetchval(
            """UPDATE api_keys SET status = 'previous', retire_at = $3, retire_delete = $4
               WHERE user_id = $1 AND key_version = $2 - 1 AND status = 'active'
               RETURNING true""",
            key.user_id,
            key.key_version,
            retire_at,
            retire_delete,
        )
        return bool(moved and previous)

    return await _store_new_key(db, key, intent, event, replace_current, "ROTATED")


async def _store_new_key(
    db: Database,
    key: NewKey,
    intent: Intent,
    event: AuditEvent,
    make_current: Callable[[asyncpg.Connection], Awaitable[bool]],
    event_kind: str,
) -> bool:
    """The commit of a key creation: our intent done, the key stored and made current, audited
    and announced, all in one transaction — or nothing at all."""
    try:
        async with db.transaction() as conn:
            if not await intents_store.finish(conn, intent, "done", key.create_time):
                raise _Rollback
            if not await make_current(conn):
                raise _Rollback
            await _insert_key(conn, key, "active")
            await insert_audit(conn, event, key.create_time)
            await key_event(conn, key.user_id, event_kind, key.key_id, key.key_version)
    except _Rollback:
        return False
    return True


class _Rollback(Exception):
    """Raised inside a transaction block to roll it back."""


async def revoke(
    db: Database, user_id: str, now: datetime, delete: bool, event: AuditEvent
) -> KeyRecord | None:
    """Revoke the current key; its provider key is retired at once (by the caller or, if that
    fails, by the background retirer). None if the user has no key or it is already revoked."""
    async with db.transaction() as conn:
        row = await conn.fetchrow(
            """UPDATE api_keys k SET status = 'revoked', retire_at = $2, retire_delete = $3
               FROM users u
               WHERE u.user_id = $1 AND k.user_id = u.user_id
                 AND k.key_version = u.current_key_version AND k.status = 'active'
               RETURNING k.user_id, k.key_version, k.key_id, k.status, k.create_time,
                         k.retire_at, k.retire_delete""",
            user_id,
            now,
            delete,
        )
        if row is None:
            return None
        # Revocation also ends the grace of earlier keys still working at the provider.
        await conn.execute(
            """UPDATE api_keys SET retire_at = $2
               WHERE user_id = $1 AND retired_time IS NULL AND retire_at > $2""",
            user_id,
            now,
        )
        await insert_audit(conn, event, now)
        await key_event(conn, user_id, "REVOKED", row["key_id"], row["key_version"])
    return KeyRecord(**dict(row))


async def update_settings(
    db: Database,
    user_id: str,
    now: datetime,
    event: AuditEvent,
    tier: str | None = None,
    custom_limit: Decimal | None = None,
    clear_custom_limit: bool = False,
    disabled: bool | None = None,
    requests_per_minute: int | None = None,
) -> bool:
    """Change a user's settings; the audit row and the key events go in the same transaction.
    requests_per_minute: None leaves it, 0 removes the custom limit, n sets it."""
    async with db.transaction() as conn:
        row = await conn.fetchrow(
            """UPDATE users u SET
                   tier = coalesce($2, u.tier),
                   custom_limit_usd = CASE WHEN $4 THEN NULL ELSE coalesce($3, u.custom_limit_usd) END,
                   disabled = coalesce($5, u.disabled),
                   update_time = $6,
                   custom_requests_per_minute = CASE WHEN $7::integer IS NULL
                       THEN u.custom_requests_per_minute ELSE nullif($7::integer, 0) END
               FROM (SELECT tier, custom_limit_usd, disabled FROM users
                     WHERE user_id = $1 FOR UPDATE) old
               WHERE u.user_id = $1
               RETURNING old.disabled AS was_disabled, u.disabled,
                         (old.tier, old.custom_limit_usd) IS DISTINCT FROM (u.tier, u.custom_limit_usd)
                             AS limit_changed,
                         u.current_key_version""",
            user_id,
            tier,
            custom_limit,
            clear_custom_limit,
            disabled,
            now,
            requests_per_minute,
        )
        if row is None:
            return False
        await insert_audit(conn, event, now)
        key_id = await conn.fetchval(
            "SELECT key_id FROM api_keys WHERE user_id = $1 AND key_version = $2",
            user_id,
            row["current_key_version"],
        )
        kinds = ["LIMIT_CHANGED"] if row["limit_changed"] else []
        if row["disabled"] != row["was_disabled"]:
            kinds.append("DISABLED" if row["disabled"] else "ENABLED")
        for kind in kinds:
            await key_event(conn, user_id, kind, key_id, row["current_key_version"])
    return True


async def due_retirements(
    db: Database, now: datetime, limit: int = 100, user_id: str | None = None
) -> list[KeyRecord]:
    rows = await db.fetch(
        """SELECT user_id, key_version, key_id, status, create_time, retire_at, retire_delete
           FROM api_keys
           WHERE retire_at <= $1 AND retired_time IS NULL AND ($3::text IS NULL OR user_id = $3)
           ORDER BY retire_at LIMIT $2""",
        now,
        limit,
        user_id,
    )
    return [KeyRecord(**dict(row)) for row in rows]


async def mark_retired(db: Database, key: KeyRecord, now: datetime) -> bool:
    """Record a finished retirement once; False if another retirer recorded it first."""
    async with db.transaction() as conn:
        marked = await conn.fetchval(
            """UPDATE api_keys SET retired_time = $3
               WHERE user_id = $1 AND key_version = $2 AND retired_time IS NULL RETURNING true""",
            key.user_id,
            key.key_version,
            now,
        )
        if not marked:
            return False
        event = AuditEvent(
            key.user_id,
            "system",
            "key.retired",
            {"key_id": key.key_id, "key_version": key.key_version, "deleted": key.retire_delete},
        )
        await insert_audit(conn, event, now)
    return True


async def _insert_key(conn: asyncpg.Connection, key: NewKey, status: str) -> None:
    await conn.execute(
        """INSERT INTO api_keys (user_id, key_version, key_id, provider_name, status, sealed_secret,
                                 kek_id, request_id, limit_base_usd, limit_base_period, create_time)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)""",
        key.user_id,
        key.key_version,
        key.key_id,
        key.provider_name,
        status,
        key.sealed,
        key.kek_id,
        key.request_id,
        key.limit_base_usd,
        key.limit_base_period,
        key.create_time,
    )
