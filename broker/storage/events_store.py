"""SQL of the key change log (table key_events): appended in key-change transactions, read by
the event hub."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from broker.db import Database

CHANNEL = "keybroker_key_events"
_NIL_UUID = "00000000-0000-0000-0000-000000000000"


@dataclass(frozen=True)
class KeyEvent:
    """One committed change of a user's key, as WatchKeys streams it."""

    event_id: str
    user_id: str
    kind: str  # PROVISIONED, ROTATED, REVOKED, DISABLED, ENABLED, LIMIT_CHANGED
    key_id: str
    key_version: int
    event_time: datetime


async def database_now(db: Database) -> datetime:
    """The database's clock: event times come from it, so watermarks must too."""
    now: datetime = await db.fetchval("SELECT clock_timestamp()")
    return now


async def events_after(
    db: Database, after: datetime, after_id: str | None = None, limit: int = 500
) -> list[KeyEvent]:
    """Up to `limit` events after (event_time, event_id) = (`after`, `after_id`), oldest first.

    Paging by (event_time, event_id) lets a caller walk a burst larger than `limit` page by page.
    """
    rows = await db.fetch(
        """SELECT event_id::text, user_id, kind, key_id, key_version, event_time
           FROM key_events
           WHERE event_time >= $1 AND (event_time > $1 OR event_id > $2::uuid)
           ORDER BY event_time, event_id
           LIMIT $3""",
        after,
        after_id or _NIL_UUID,
        limit,
    )
    return [KeyEvent(**dict(row)) for row in rows]


async def key_event(conn: asyncpg.Connection, user_id: str, kind: str, key_id: str, key_version: int) -> None:
    """Append to the key change log (WatchKeys); NOTIFY fires when the transaction commits."""
    await conn.execute("SELECT kb_key_event($1, $2, $3, $4)", user_id, kind, key_id, key_version)
