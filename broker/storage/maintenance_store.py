"""SQL of background maintenance: reconciliation rows, rotation candidates, leases, report limits."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal

from broker.db import Database


@dataclass(frozen=True)
class KeyState:
    """One api_keys row as the reconciler compares it with OpenRouter."""

    user_id: str
    key_version: int
    key_id: str
    status: str
    is_current: bool
    user_disabled: bool
    limit_usd: Decimal | None
    limit_base_usd: Decimal
    limit_base_period: date
    retire_at: datetime | None
    retire_delete: bool
    retired_time: datetime | None
    recorded_usd: Decimal  # this month's recorded spend made with this key


async def key_states(db: Database, period: date) -> list[KeyState]:
    rows = await db.fetch(
        """SELECT k.user_id, k.key_version, k.key_id, k.status,
                  u.current_key_version = k.key_version AS is_current,
                  u.disabled AS user_disabled,
                  coalesce(u.custom_limit_usd, t.monthly_limit_usd) AS limit_usd,
                  k.limit_base_usd, k.limit_base_period, k.retire_at, k.retire_delete, k.retired_time,
                  coalesce((SELECT sum(l.cost_usd) FROM usage_ledger l
                            WHERE l.user_id = k.user_id AND l.period_start = $1
                              AND l.key_version = k.key_version), 0) AS recorded_usd
           FROM api_keys k
           JOIN users u ON u.user_id = k.user_id
           JOIN tiers t ON t.name = u.tier
           ORDER BY k.user_id, k.key_version""",
        period,
    )
    return [KeyState(**dict(row)) for row in rows]


async def restart_limit_base(db: Database, user_id: str, key_version: int, period: date) -> None:
    """A new month: the key's provider window restarted, so its base spend is zero again."""
    await db.execute(
        """UPDATE api_keys SET limit_base_usd = 0, limit_base_period = $3
           WHERE user_id = $1 AND key_version = $2 AND limit_base_period < $3""",
        user_id,
        key_version,
        period,
    )


async def rotation_candidates(db: Database, created_before: datetime, limit: int) -> list[str]:
    """Users whose active key was created before the cut-off (suspended users excluded)."""
    rows = await db.fetch(
        """SELECT u.user_id FROM users u
           JOIN api_keys k ON k.user_id = u.user_id AND k.key_version = u.current_key_version
           WHERE k.status = 'active' AND NOT u.disabled AND k.create_time < $1
           ORDER BY k.create_time LIMIT $2""",
        created_before,
        limit,
    )
    return [row["user_id"] for row in rows]


async def take_report_slot(db: Database, user_id: str, now: datetime, not_before: datetime) -> bool:
    """Rate limit of ReportKeyInvalid: True if no check of this user happened since not_before."""
    taken = await db.fetchval(
        """INSERT INTO key_invalid_reports AS r (user_id, last_check_time, checks)
           VALUES ($1, $2, 1)
           ON CONFLICT (user_id) DO UPDATE SET last_check_time = $2, checks = r.checks + 1
           WHERE r.last_check_time <= $3
           RETURNING true""",
        user_id,
        now,
        not_before,
    )
    return bool(taken)


async def hold_lease(db: Database, name: str, holder: str, now: datetime, expire: datetime) -> bool:
    """Take or renew the lease `name`; True if `holder` holds it until `expire`."""
    held = await db.fetchval(
        """INSERT INTO leases AS l (name, holder, expire_time) VALUES ($1, $2, $4)
           ON CONFLICT (name) DO UPDATE SET holder = $2, expire_time = $4
           WHERE l.holder = $2 OR l.expire_time <= $3
           RETURNING true""",
        name,
        holder,
        now,
        expire,
    )
    return bool(held)


async def release_lease(db: Database, name: str, holder: str) -> None:
    await db.execute("DELETE FROM leases WHERE name = $1 AND holder = $2", name, holder)
