"""SQL of key-creation intents: claimed before OpenRouter creates a key, finished with the commit
that stores it, rolled back when the attempt died (see sql/0003, table key_intents)."""

# ruff: noqa: S608 - the only interpolation is the constant column list _COLUMNS
from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from broker.db import Database

_COLUMNS = "user_id, key_version, request_id, kind, provider_name, attempt, state, create_time, update_time"


@dataclass(frozen=True)
class Intent:
    user_id: str
    key_version: int
    request_id: str
    kind: str  # provision | rotate
    provider_name: str
    attempt: uuid.UUID
    state: str  # pending | done | rolled_back
    create_time: datetime
    update_time: datetime


@dataclass(frozen=True)
class Claim:
    """The outcome of claiming (user, version): `intent` is ours when `claimed`; otherwise it is
    the intent in the way. `took_over` is the dead attempt we replaced (its key may be orphaned)."""

    claimed: bool
    intent: Intent
    took_over: Intent | None = None


async def claim(
    db: Database,
    user_id: str,
    key_version: int,
    request_id: str,
    kind: str,
    provider_name: str,
    now: datetime,
    stale_before: datetime,
) -> Claim:
    attempt = uuid.uuid4()
    async with db.transaction() as conn:
        row = await conn.fetchrow(
            f"""INSERT INTO key_intents ({_COLUMNS})
                VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7, $7)
                ON CONFLICT (user_id, key_version) DO NOTHING RETURNING {_COLUMNS}""",
            user_id,
            key_version,
            request_id,
            kind,
            provider_name,
            attempt,
            now,
        )
        if row is not None:
            return Claim(True, Intent(**dict(row)))
        current = await conn.fetchrow(
            f"""SELECT {_COLUMNS} FROM key_intents
                WHERE user_id = $1 AND key_version = $2 FOR UPDATE""",
            user_id,
            key_version,
        )
        assert current is not None
        previous = Intent(**dict(current))
        dead = previous.state == "rolled_back" or (
            previous.state == "pending" and previous.update_time < stale_before
        )
        if not dead:
            return Claim(False, previous)
        row = await conn.fetchrow(
            f"""UPDATE key_intents
                SET request_id = $3, kind = $4, provider_name = $5, attempt = $6,
                    state = 'pending', update_time = $7
                WHERE user_id = $1 AND key_version = $2 RETURNING {_COLUMNS}""",
            user_id,
            key_version,
            request_id,
            kind,
            provider_name,
            attempt,
            now,
        )
        assert row is not None
        return Claim(True, Intent(**dict(row)), took_over=previous)


async def finish(conn: asyncpg.Connection, intent: Intent, state: str, now: datetime) -> bool:
    """Close our attempt (in the caller's transaction). False if another attempt took it over."""
    done = await conn.fetchval(
        """UPDATE key_intents SET state = $4, update_time = $5
           WHERE user_id = $1 AND key_version = $2 AND attempt = $3 AND state = 'pending'
           RETURNING true""",
        intent.user_id,
        intent.key_version,
        intent.attempt,
        state,
        now,
    )
    return bool(done)


async def roll_back(db: Database, intent: Intent, now: datetime) -> bool:
    async with db.connection() as conn:
        return await finish(conn, intent, "rolled_back", now)


async def abandon(db: Database, intent: Intent) -> None:
    """Our attempt failed but may have left a provider key we could not remove: mark the intent
    dead at once, so the next claim (or the roll-back task) takes over and cleans up first."""
    await db.execute(
        """UPDATE key_intents SET update_time = '1970-01-01 00:00:00+00'
           WHERE user_id = $1 AND key_version = $2 AND attempt = $3 AND state = 'pending'""",
        intent.user_id,
        intent.key_version,
        intent.attempt,
    )


async def find(db: Database, user_id: str, key_version: int) -> Intent | None:
    row = await db.fetchrow(
        f"SELECT {_COLUMNS} FROM key_intents WHERE user_id = $1 AND key_version = $2",
        user_id,
        key_version,
    )
    return None if row is None else Intent(**dict(row))


async def stale_pending(db: Database, stale_before: datetime, limit: int = 100) -> list[Intent]:
    rows = await db.fetch(
        f"""SELECT {_COLUMNS} FROM key_intents
            WHERE state = 'pending' AND update_time < $1 ORDER BY update_time LIMIT $2""",
        stale_before,
        limit,
    )
    return [Intent(**dict(row)) for row in rows]


async def live_pending_names(db: Database, stale_before: datetime) -> set[str]:
    """Provider key names that an attempt in flight may be creating right now."""
    rows = await db.fetch(
        "SELECT provider_name FROM key_intents WHERE state = 'pending' AND update_time >= $1",
        stale_before,
    )
    return {row["provider_name"] for row in rows}
