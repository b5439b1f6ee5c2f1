"""SQL of the audit chain check: links in chain order, chain heads, heads without rows.

Reads run in one REPEATABLE READ, read-only transaction so the links and the heads come from the
same snapshot while the broker keeps appending.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import asyncpg

from broker.db import Database


@dataclass(frozen=True)
class AuditLink:
    user_id: str
    seq: int
    # event_time as PostgreSQL renders it inside kb_audit_content: whole microseconds since 1970.
    epoch_micros: int
    actor: str
    action: str
    details: str  # jsonb::text, exactly as hashed
    prev_hash: bytes
    row_hash: bytes


@dataclass(frozen=True)
class ChainHead:
    user_id: str
    seq: int
    row_hash: bytes


class AuditSnapshot:
    """Reads of one consistent snapshot of the audit tables."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def links(self, after: tuple[str, int], limit: int) -> list[AuditLink]:
        """The next links in (user_id, seq) order after `after`; ('', 0) starts at the beginning
        (seq starts at 1 and '' sorts first in every collation)."""
        rows = await self.conn.fetch(
            """SELECT user_id, seq, (extract(epoch FROM event_time) * 1000000)::bigint AS epoch_micros,
                      actor, action, details::text AS details, prev_hash, row_hash
               FROM audit_log WHERE (user_id, seq) > ($1, $2)
               ORDER BY user_id, seq LIMIT $3""",
            after[0],
            after[1],
            limit,
        )
        return [AuditLink(**dict(row)) for row in rows]

    async def heads(self, user_ids: Sequence[str]) -> dict[str, ChainHead]:
        rows = await self.conn.fetch(
            "SELECT user_id, seq, row_hash FROM audit_heads WHERE user_id = ANY($1::text[])", list(user_ids)
        )
        return {row["user_id"]: ChainHead(**dict(row)) for row in rows}

    async def first_head_without_rows(self, before: str | None, genesis: bytes) -> ChainHead | None:
        """The first head (in user_id order, before `before` if given) that claims rows its chain
        does not have. An empty chain's head is (0, genesis)."""
        row = await self.conn.fetchrow(
            """SELECT h.user_id, h.seq, h.row_hash FROM audit_heads h
               WHERE ($1::text IS NULL OR h.user_id < $1::text)
                 AND (h.seq <> 0 OR h.row_hash <> $2)
                 AND NOT EXISTS (SELECT 1 FROM audit_log a WHERE a.user_id = h.user_id)
               ORDER BY h.user_id LIMIT 1""",
            before,
            genesis,
        )
        return None if row is None else ChainHead(**dict(row))


@asynccontextmanager
async def snapshot(db: Database) -> AsyncIterator[AuditSnapshot]:
    async with db.connection() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        yield AuditSnapshot(conn)
