"""SQL that appends to the tamper-evident audit log (per-user hash chains, sql/0003 kb_audit)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg


@dataclass(frozen=True)
class AuditEvent:
    user_id: str
    actor: str
    action: str
    details: dict[str, Any]


async def insert_audit(conn: asyncpg.Connection, event: AuditEvent, now: datetime) -> None:
    """Append to the user's tamper-evident audit chain (see kb_audit in sql/0003)."""
    await conn.execute(
        "SELECT kb_audit($1, $2, $3, $4, $5::jsonb)",
        event.user_id,
        now,
        event.actor,
        event.action,
        json.dumps(event.details, default=str),
    )
