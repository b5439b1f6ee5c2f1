"""SQL of caller tokens (only hashes are stored) and the audit log reads."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from broker.db import Database
from broker.storage.audit_writes import AuditEvent, insert_audit


@dataclass(frozen=True)
class TokenRow:
    token_id: str
    name: str
    scope: str
    secret_hash: bytes
    create_time: datetime
    revoke_time: datetime | None


class TokenNameTaken(Exception):
    pass


async def insert_token(
    db: Database, token_id: str, name: str, scope: str, secret_hash: bytes, now: datetime, actor: str
) -> None:
    async with db.transaction() as conn:
        taken = await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM caller_tokens WHERE name = $1 AND revoke_time IS NULL)", name
        )
        if taken:
            raise TokenNameTaken(name)
        await conn.execute(
            """INSERT INTO caller_tokens (token_id, name, scope, secret_hash, create_time)
               VALUES ($1, $2, $3, $4, $5)""",
            token_id,
            name,
            scope,
            secret_hash,
            now,
        )
        await insert_audit(conn, AuditEvent("", actor, "token.created", {"name": name, "scope": scope}), now)


async def find_token(db: Database, token_id: str) -> TokenRow | None:
    row = await db.fetchrow(
        """SELECT token_id, name, scope, secret_hash, create_time, revoke_time
           FROM caller_tokens WHERE token_id = $1""",
        token_id,
    )
    return None if row is None else TokenRow(**dict(row))


async def list_tokens(db: Database, include_revoked: bool = False) -> list[TokenRow]:
    rows = await db.fetch(
        """SELECT token_id, name, scope, secret_hash, create_time, revoke_time FROM caller_tokens
           WHERE $1 OR revoke_time IS NULL ORDER BY create_time""",
        include_revoked,
    )
    return [TokenRow(**dict(row)) for row in rows]


async def revoke_token(db: Database, name: str, now: datetime, actor: str) -> bool:
    async with db.transaction() as conn:
        revoked = await conn.fetchval(
            """UPDATE caller_tokens SET revoke_time = $2
               WHERE name = $1 AND revoke_time IS NULL RETURNING true""",
            name,
            now,
        )
        if not revoked:
            return False
        await insert_audit(conn, AuditEvent("", actor, "token.revoked", {"name": name}), now)
    return True


@dataclass(frozen=True)
class AuditRow:
    user_id: str
    event_time: datetime
    actor: str
    action: str
    details: str


async def list_audit(
    db: Database, user_id: str | None, limit: int, since: datetime | None = None
) -> list[AuditRow]:
    rows = await db.fetch(
        """SELECT user_id, event_time, actor, action, details::text AS details FROM audit_log
           WHERE ($1::text IS NULL OR user_id = $1) AND ($3::timestamptz IS NULL OR event_time >= $3)
           ORDER BY event_time DESC LIMIT $2""",
        user_id,
        limit,
        since,
    )
    return [AuditRow(**dict(row)) for row in rows]
