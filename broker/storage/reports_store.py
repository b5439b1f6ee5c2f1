"""SQL of the cost reports: read from the roll-ups (usage_daily, usage_periods), never the ledger.

usage_daily is kept per (user, UTC day, model, agent) by kb_record_usage in the RecordUsage
transaction, and usage_periods per (user, month); so a report reads a day's or a month's roll-up
rows, whatever the size of the ledger.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from decimal import Decimal

from broker.db import Database

REPORT_WORK_MEM = "64MB"

# One day's rows per (user, model), summed over agents; highest cost first.
DAILY_SQL = """
SELECT user_id, model, sum(requests)::bigint AS requests, sum(total_tokens)::bigint AS tokens,
       sum(cost_usd) AS cost_usd
FROM usage_daily
WHERE day = $1
GROUP BY user_id, model
ORDER BY cost_usd DESC, user_id, model
"""

# Each user with usage in the month: spend and requests from the period counter, the current limit
# (custom, else the tier's; NULL = unlimited), and the three models with the highest cost (ties by
# model name) from the daily roll-ups.
MONTHLY_SQL = """
WITH by_model AS (
    SELECT user_id, model, sum(cost_usd) AS cost_usd
    FROM usage_daily
    WHERE day >= $1 AND day < $2
    GROUP BY user_id, model
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
SELECT p.user_id, p.spent_usd, p.request_count,
       coalesce(u.custom_limit_usd, t.monthly_limit_usd) AS limit_usd,
       top.models, top.costs
FROM usage_periods p
LEFT JOIN users u ON u.user_id = p.user_id
LEFT JOIN tiers t ON t.name = u.tier
LEFT JOIN top ON top.user_id = p.user_id
WHERE p.period_start = $1 AND p.request_count > 0
ORDER BY p.spent_usd DESC, p.user_id
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


async def daily_rows(db: Database, day: date) -> list[DailyRow]:
    rows = await db.fetch(DAILY_SQL, day)
    return [DailyRow(r["user_id"], r["model"], r["requests"], r["tokens"], r["cost_usd"]) for r in rows]


async def monthly_rows(db: Database, month: date, next_month: date, top: int = 3) -> list[MonthlyRow]:
    async with db.transaction() as conn:
        # A month of roll-ups can be 10^5+ rows (180,000 in bench/report_bench.py): with the default
        # 4 MB the (user, model) aggregation sorts on disk. SET LOCAL ends with the transaction, so it
        # is safe behind PgBouncer in transaction mode.
        await conn.execute(f"SET LOCAL work_mem = '{REPORT_WORK_MEM}'")
        rows = await conn.fetch(MONTHLY_SQL, month, next_month, top)
    return [
        MonthlyRow(
            user_id=r["user_id"],
            spent_usd=r["spent_usd"],
            requests=r["request_count"],
            limit_usd=r["limit_usd"],
            top_models=tuple(zip(r["models"] or (), r["costs"] or (), strict=True)),
        )
        for r in rows
    ]
