"""SQL of the cost reports: read from the roll-ups (usage_daily, usage_periods), never the ledger.

usage_daily is kept per (user, UTC day, model, agent) by kb_record_usage in the RecordUsage
transaction, and usage_periods per (user, month); so a report reads a day's or a month's roll-up
rows, whatever the size of the ledger.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import date
from decimal import Decimal

import asyncpg

from broker.db import Database

# Settings of a report's transaction, sent in one round trip. SET LOCAL ends with the transaction,
# so they are safe behind PgBouncer in transaction mode.
# - work_mem: a month of roll-ups can be 10^5+ rows (180,000 in bench/report_bench.py); with the
#   default 4 MB the (user, model) aggregation sorts on disk.
# - plan_cache_mode: plan each report query for its actual page bounds. A generic plan (which
#   PostgreSQL may pick for a prepared statement after five runs) cannot drop the "$2 IS NULL OR
#   ..." test of a first page or see LIMIT NULL, and took the 200,000-row monthly report from ~100
#   to ~155 ms (bench/report_bench.py).
REPORT_WORK_MEM = "64MB"
REPORT_SETTINGS = f"SET LOCAL work_mem = '{REPORT_WORK_MEM}'; SET LOCAL plan_cache_mode = force_custom_plan"

# One day's rows per (user, model), summed over agents; highest cost first. $2-$4: the last row of
# the previous page (cost, user, model), or NULLs for the first page; $5: rows, or NULL for all.
DAILY_SQL = """
SELECT user_id, model, requests, tokens, cost_usd
FROM (
    SELECT user_id, model, sum(requests)::bigint AS requests, sum(total_tokens)::bigint AS tokens,
           sum(cost_usd) AS cost_usd
    FROM usage_daily
    WHERE day = $1
    GROUP BY user_id, model
) r
WHERE $2::numeric IS NULL OR r.cost_usd < $2 OR (r.cost_usd = $2 AND (r.user_id, r.model) > ($3, $4))
ORDER BY cost_usd DESC, user_id, model
LIMIT $5
"""

DAILY_TOTAL_SQL = "SELECT coalesce(sum(cost_usd), 0) FROM usage_daily WHERE day = $1"

# Each user with usage in the month, highest spend first: spend and requests from the period
# counter, the current limit (custom, else the tier's; NULL = unlimited), and the three models with
# the highest cost (ties by model name) from the daily roll-ups, read for the page's users only.
# $4-$5: the last row of the previous page (spend, user), or NULLs; $6: rows, or NULL for all.
MONTHLY_SQL = """
WITH page AS (
    SELECT p.user_id, p.spent_usd, p.request_count
    FROM usage_periods p
    WHERE p.period_start = $1 AND p.request_count > 0
      AND ($4::numeric IS NULL OR p.spent_usd < $4 OR (p.spent_usd = $4 AND p.user_id > $5))
    ORDER BY p.spent_usd DESC, p.user_id
    LIMIT $6
), by_model AS (
    SELECT d.user_id, d.model, sum(d.cost_usd) AS cost_usd
    FROM usage_daily d
    JOIN page ON page.user_id = d.user_id
    WHERE d.day >= $1 AND d.day < $2
    GROUP BY d.user_id, d.model
), ranked AS (
    SELECT user_id, model, cost_usd,
           row_number() OVER (PARTITION BY user_id ORDER BY cost_usd DESC, model) AS rank
    FROM by_model
), top AS (
    SELECT user_id, array_agg(model ORDER BY rank) AS models,
           array_agg(cost_usd ORDER BY rank) AS costs
    FROM ranked
    WHERE rank <= $3
    GROUP BY user_id
)
SELECT page.user_id, page.spent_usd, page.request_count,
       coalesce(u.custom_limit_usd, t.monthly_limit_usd) AS limit_usd,
       top.models, top.costs
FROM page
LEFT JOIN users u ON u.user_id = page.user_id
LEFT JOIN tiers t ON t.name = u.tier
LEFT JOIN top ON top.user_id = page.user_id
ORDER BY page.spent_usd DESC, page.user_id
"""

MONTHLY_TOTAL_SQL = """
SELECT coalesce(sum(spent_usd), 0) FROM usage_periods WHERE period_start = $1 AND request_count > 0
"""


@dataclass(frozen=True)
class DailyRow:
    user_id: str
    model: str
    requests: int
    tokens: int
    cost_usd: Decimal


@dataclass(frozen=True)
class MonthlyRow:
    user_id: str
    spent_usd: Decimal
    requests: int
    limit_usd: Decimal | None  # None: unlimited
    top_models: tuple[tuple[str, Decimal], ...]  # (model, cost), highest cost first


@dataclass(frozen=True)
class DailyAfter:
    """Where a page of a daily report continues: after this (cost, user, model)."""

    cost_usd: Decimal
    user_id: str
    model: str


@dataclass(frozen=True)
class MonthlyAfter:
    """Where a page of a monthly report continues: after this (spend, user)."""

    spent_usd: Decimal
    user_id: str


@asynccontextmanager
async def report_transaction(db: Database) -> AsyncIterator[asyncpg.Connection]:
    """A read-only snapshot, so that a report's rows and its total agree, with REPORT_SETTINGS."""
    async with db.connection() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        await conn.execute(REPORT_SETTINGS)
        yield conn


async def daily_rows(
    db: Database, day: date, after: DailyAfter | None = None, limit: int | None = None
) -> tuple[list[DailyRow], Decimal]:
    """A page of the day's rows (all rows when `limit` is None), and the day's total cost."""
    async with report_transaction(db) as conn:
        rows = await conn.fetch(
            DAILY_SQL,
            day,
            after.cost_usd if after else None,
            after.user_id if after else None,
            after.model if after else None,
            limit,
        )
        total = await conn.fetchval(DAILY_TOTAL_SQL, day)
    page = [DailyRow(r["user_id"], r["model"], r["requests"], r["tokens"], r["cost_usd"]) for r in rows]
    return page, total


async def monthly_rows(
    db: Database,
    month: date,
    next_month: date,
    top: int = 3,
    after: MonthlyAfter | None = None,
    limit: int | None = None,
) -> tuple[list[MonthlyRow], Decimal]:
    """A page of the month's rows (all rows when `limit` is None), and the month's total spend."""
    async with report_transaction(db) as conn:
        rows = await conn.fetch(
            MONTHLY_SQL,
            month,
            next_month,
            top,
            after.spent_usd if after else None,
            after.user_id if after else None,
            limit,
        )
        total = await conn.fetchval(MONTHLY_TOTAL_SQL, month)
    page = [
        MonthlyRow(
            user_id=r["user_id"],
            spent_usd=r["spent_usd"],
            requests=r["request_count"],
            limit_usd=r["limit_usd"],
            top_models=tuple(zip(r["models"] or (), r["costs"] or (), strict=True)),
        )
        for r in rows
    ]
    return page, total
