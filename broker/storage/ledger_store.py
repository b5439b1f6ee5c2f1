"""SQL of the money path: limit checks, reservations, usage records, summaries."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal

import asyncpg

from broker.db import Database


class DuplicateRaced(Exception):
    """kb_record_usage saw its request recorded concurrently (SQLSTATE KB409): run it again."""


@dataclass(frozen=True)
class LimitRow:
    outcome: str  # ok | no_key | disabled
    allowed: bool
    limit_usd: Decimal | None
    spent_usd: Decimal
    reserved_usd: Decimal
    key_version: int
    reservation_id: uuid.UUID | None
    reservation_expire_time: datetime | None


@dataclass(frozen=True)
class UsageRow:
    outcome: str  # ok | no_key
    duplicate: bool
    spent_usd: Decimal
    remaining_usd: Decimal | None
    over_limit: bool


@dataclass(frozen=True)
class UsageTotals:
    requests: int
    tokens: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: Decimal


@dataclass(frozen=True)
class GroupTotals:
    name: str
    requests: int
    tokens: int
    cost_usd: Decimal


async def check_limit(
    db: Database,
    user_id: str,
    estimate: Decimal | None,
    request_id: str | None,
    now: datetime,
    period: date,
    expire_time: datetime,
) -> LimitRow:
    row = await db.fetchrow(
        "SELECT * FROM kb_check_limit($1, $2, $3, $4, $5, $6, $7)",
        user_id,
        estimate,
        request_id,
        uuid.uuid4() if estimate is not None else None,  # the id of a new reservation, if any
        now,
        period,
        expire_time,
    )
    assert row is not None
    return LimitRow(
        outcome=row["o_outcome"],
        allowed=row["o_allowed"],
        limit_usd=row["o_limit"],
        spent_usd=row["o_spent"] or Decimal(0),
        reserved_usd=row["o_reserved"] or Decimal(0),
        key_version=row["o_key_version"] or 0,
        reservation_id=row["o_reservation_id"],
        reservation_expire_time=row["o_expire_time"],
    )


@dataclass(frozen=True)
class UsageRecord:
    user_id: str
    request_id: str
    reservation_id: uuid.UUID | None
    model: str
    agent: str
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_usd: Decimal
    duration_ms: int


async def record_usage(
    db: Database,
    usage: UsageRecord,
    now: datetime,
    period: date,
    thresholds: tuple[Decimal, ...] = (),
) -> UsageRow:
    async def call(conn: asyncpg.Connection) -> asyncpg.Record | None:
        try:
            return await conn.fetchrow(
                "SELECT * FROM kb_record_usage($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
                usage.user_id,
                usage.request_id,
                usage.reservation_id,
                usage.model,
                usage.agent,
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.total_tokens,
                usage.cost_usd,
                usage.duration_ms,
                now,
                period,
                list(thresholds),
            )
        except asyncpg.RaiseError as exc:
            if exc.sqlstate == "KB409":
                raise DuplicateRaced from exc
            raise

    row = await db.retrying(call, retry_on=(DuplicateRaced,))
    assert row is not None
    return UsageRow(
        outcome=row["o_outcome"],
        duplicate=row["o_duplicate"],
        spent_usd=row["o_spent"] or Decimal(0),
        remaining_usd=row["o_remaining"],
        over_limit=row["o_over_limit"],
    )


async def release_reservation(
    db: Database, user_id: str, reservation_id: uuid.UUID, now: datetime, period: date
) -> tuple[bool, Decimal]:
    row = await db.fetchrow(
        "SELECT * FROM kb_release_reservation($1, $2, $3, $4)", user_id, reservation_id, now, period
    )
    assert row is not None
    return bool(row["o_released"]), row["o_reserved"] or Decimal(0)


async def release_all_expired(db: Database, now: datetime, period: date, batch: int = 500) -> int:
    """Background sweep: release expired reservations of every user (one user per statement)."""
    users = await db.fetch(
        "SELECT DISTINCT user_id FROM reservations WHERE expire_time <= $1 LIMIT $2", now, batch
    )
    for row in users:
        await db.execute(
            "SELECT kb_lock_period($1, $2), kb_release_expired($1, $3)", row["user_id"], period, now
        )
    return len(users)


async def count_open_reservations(db: Database, now: datetime) -> int:
    return int(await db.fetchval("SELECT count(*) FROM reservations WHERE expire_time > $1", now))


async def period_totals(db: Database, user_id: str, period: date, now: datetime) -> tuple[Decimal, Decimal]:
    row = await db.fetchrow("SELECT * FROM kb_period_totals($1, $2, $3)", user_id, period, now)
    assert row is not None
    return row["spent_usd"], row["reserved_usd"]


async def usage_summary(
    db: Database, user_id: str, period: date
) -> tuple[UsageTotals, list[GroupTotals], list[GroupTotals]]:
    """A month's totals and breakdowns, from the daily roll-ups (fast on any ledger size)."""
    rows = await db.fetch(
        """SELECT grouping(model) AS by_agent, coalesce(model, agent) AS name,
                  sum(requests) AS requests, sum(total_tokens) AS tokens,
                  sum(prompt_tokens) AS prompt_tokens, sum(completion_tokens) AS completion_tokens,
                  sum(cost_usd) AS cost_usd
           FROM usage_daily
           WHERE user_id = $1 AND day >= $2 AND day < ($2 + interval '1 month')::date
           GROUP BY GROUPING SETS ((model), (agent))
           ORDER BY sum(cost_usd) DESC, 2""",
        user_id,
        period,
    )
    by_model: list[GroupTotals] = []
    by_agent: list[GroupTotals] = []
    for row in rows:
        group = GroupTotals(row["name"], int(row["requests"]), int(row["tokens"]), row["cost_usd"])
        (by_agent if row["by_agent"] else by_model).append(group)
    totals = UsageTotals(
        requests=int(sum(r["requests"] for r in rows if not r["by_agent"])),
        tokens=int(sum(r["tokens"] for r in rows if not r["by_agent"])),
        prompt_tokens=int(sum(r["prompt_tokens"] for r in rows if not r["by_agent"])),
        completion_tokens=int(sum(r["completion_tokens"] for r in rows if not r["by_agent"])),
        cost_usd=sum((r["cost_usd"] for r in rows if not r["by_agent"]), Decimal(0)),
    )
    return totals, by_model, by_agent
