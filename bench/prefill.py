"""Item 4 of issue 6: bulk-load the usage ledger (COPY) so the hot path can be measured at size.

Rows are spread round-robin over the benchmark's users and over the `months` calendar months
before the current one; the users' usage_periods counters (spent, request_count) are raised by the
same amounts in the same transaction, so the database stays consistent with the money rules. Each
row's spent_after/remaining_after are the running totals a real RecordUsage would have written.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg

LEDGER_COLUMNS = (
    "user_id",
    "request_id",
    "period_start",
    "record_time",
    "key_version",
    "reservation_id",
    "model",
    "agent",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost_usd",
    "duration_ms",
    "spent_after_usd",
    "remaining_after_usd",
    "over_limit",
)
MODELS = ("openai/gpt-4o-mini", "anthropic/claude-3.5-haiku", "google/gemini-2.0-flash", "meta/llama-3.3")
AGENTS = ("planner", "researcher", "writer")
COSTS = tuple(Decimal(c) for c in ("0.000120", "0.000450", "0.001200", "0.003300", "0.000015"))
CHUNK = 100_000
CONNECT_TIMEOUT = 30.0
COPY_TIMEOUT = 1800.0
UPSERT_PERIOD = """
INSERT INTO usage_periods (user_id, period_start, spent_usd, request_count)
VALUES ($1, $2, $3, $4)
ON CONFLICT (user_id, period_start) DO UPDATE
SET spent_usd = usage_periods.spent_usd + excluded.spent_usd,
    request_count = usage_periods.request_count + excluded.request_count
"""

# As sql/0004's back-fill, for the prefill rows `request_id BETWEEN $1 AND $2` only.
ROLL_UP_DAILY = """
INSERT INTO usage_daily AS d
SELECT user_id, (record_time AT TIME ZONE 'UTC')::date, model, agent, count(*),
       sum(prompt_tokens), sum(completion_tokens), sum(total_tokens), sum(cost_usd)
FROM usage_ledger WHERE request_id BETWEEN $1 AND $2 GROUP BY 1, 2, 3, 4
ON CONFLICT (user_id, day, model, agent) DO UPDATE
SET requests = d.requests + excluded.requests, prompt_tokens = d.prompt_tokens + excluded.prompt_tokens,
    completion_tokens = d.completion_tokens + excluded.completion_tokens,
    total_tokens = d.total_tokens + excluded.total_tokens, cost_usd = d.cost_usd + excluded.cost_usd
"""
ROLL_UP_HOURLY = """
INSERT INTO usage_hourly AS h
SELECT user_id, date_trunc('hour', record_time AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', count(*),
       sum(cost_usd)
FROM usage_ledger WHERE request_id BETWEEN $1 AND $2 GROUP BY 1, 2
ON CONFLICT (user_id, hour) DO UPDATE
SET requests = h.requests + excluded.requests, cost_usd = h.cost_usd + excluded.cost_usd
"""


def month_start(day: date, months_back: int) -> date:
    index = day.year * 12 + (day.month - 1) - months_back
    return date(index // 12, index % 12 + 1, 1)


def past_months(now: datetime, months: int) -> list[date]:
    today = now.astimezone(UTC).date()
    return [month_start(today, back) for back in range(1, months + 1)]


def ledger_rows(
    users: list[str],
    limits: Mapping[str, Decimal | None],
    periods: list[date],
    first: int,
    count: int,
    running: dict[tuple[str, date], Decimal],
) -> Iterator[tuple[Any, ...]]:
    """Rows `first`..`first+count-1` of the deterministic prefill sequence."""
    n_users, n_periods = len(users), len(periods)
    for j in range(first, first + count):
        user = users[j % n_users]
        period = periods[(j // n_users) % n_periods]
        cost = COSTS[j % len(COSTS)]
        key = (user, period)
        spent = running.get(key, Decimal(0)) + cost
        running[key] = spent
        limit = limits.get(user)
        prompt, completion = 100 + j % 900, 50 + j % 400
        record_time = datetime(period.year, period.month, 1, tzinfo=UTC) + timedelta(
            seconds=(j * 7919) % (28 * 86400)
        )
        yield (
            user,
            f"prefill-{j:010d}",
            period,
            record_time,
            1,
            None,
            MODELS[j % len(MODELS)],
            AGENTS[j % len(AGENTS)],
            prompt,
            completion,
            prompt + completion,
            cost,
            200 + j % 5000,
            spent,
            None if limit is None else limit - spent,
            limit is not None and spent >= limit,
        )


async def prefill(
    dsn: str,
    limits: Mapping[str, Decimal | None],
    first: int,
    rows: int,
    months: int,
    log: Any = print,
) -> float:
    """COPY rows `first`..`first+rows-1` into usage_ledger (one transaction, with the period
    counters and the daily/hourly roll-ups); then VACUUM ANALYZE (as autovacuum would,
    eventually) and CHECKPOINT. Returns the seconds taken."""
    if rows <= 0:
        return 0.0
    started = time.monotonic()
    users = sorted(limits)
    periods = past_months(datetime.now(UTC), months)
    conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT)
    try:
        running = await _period_spend(conn, users, periods)
        before = dict(running)
        counts: dict[tuple[str, date], int] = {}
        async with conn.transaction():
            for offset in range(first, first + rows, CHUNK):
                size = min(CHUNK, first + rows - offset)
                batch = list(ledger_rows(users, limits, periods, offset, size, running))
                for row in batch:
                    counts[(row[0], row[2])] = counts.get((row[0], row[2]), 0) + 1
                await conn.copy_records_to_table(
                    "usage_ledger", records=batch, columns=LEDGER_COLUMNS, timeout=COPY_TIMEOUT
                )
                done = offset + size - first
                if done % 1_000_000 < CHUNK or done == rows:
                    log(f"  prefill: {done:,} / {rows:,} rows ({time.monotonic() - started:.0f}s)")
            deltas = [
                (user, period, running[(user, period)] - before.get((user, period), Decimal(0)), n)
                for (user, period), n in counts.items()
            ]
            await conn.executemany(UPSERT_PERIOD, deltas, timeout=COPY_TIMEOUT)
            # The roll-ups kb_record_usage keeps per call, for the same rows: without them a
            # prefilled month's GetUsageSummary would read nothing and be fast for no reason.
            ids = (f"prefill-{first:010d}", f"prefill-{first + rows - 1:010d}")
            await conn.execute(ROLL_UP_DAILY, *ids, timeout=COPY_TIMEOUT)
            await conn.execute(ROLL_UP_HOURLY, *ids, timeout=COPY_TIMEOUT)
            await verify_periods(conn, periods)
        await conn.execute("VACUUM (ANALYZE) usage_ledger", timeout=COPY_TIMEOUT)
        await conn.execute("VACUUM (ANALYZE) usage_periods", timeout=COPY_TIMEOUT)
        await conn.execute("VACUUM (ANALYZE) usage_daily", timeout=COPY_TIMEOUT)
        await conn.execute("VACUUM (ANALYZE) usage_hourly", timeout=COPY_TIMEOUT)
        # Write the loaded pages out now, not during the next measurement.
        await conn.execute("CHECKPOINT", timeout=COPY_TIMEOUT)
    finally:
        await conn.close()
    return time.monotonic() - started


async def verify_periods(conn: asyncpg.Connection, periods: list[date]) -> None:
    """The prefilled months' counters must equal their ledger rows (as RecordUsage keeps them)."""
    wrong = await conn.fetchval(
        """SELECT count(*) FROM (
               SELECT user_id, period_start, sum(cost_usd) AS spent, count(*) AS requests
               FROM usage_ledger WHERE period_start = ANY($1::date[]) GROUP BY user_id, period_start
           ) l LEFT JOIN usage_periods p USING (user_id, period_start)
           WHERE p.spent_usd IS DISTINCT FROM l.spent OR p.request_count IS DISTINCT FROM l.requests""",
        periods,
        timeout=COPY_TIMEOUT,
    )
    if wrong:
        raise RuntimeError(f"prefill left {wrong} usage_periods rows inconsistent with the ledger")


async def _period_spend(
    conn: asyncpg.Connection, users: list[str], periods: list[date]
) -> dict[tuple[str, date], Decimal]:
    rows = await conn.fetch(
        "SELECT user_id, period_start, spent_usd FROM usage_periods "
        "WHERE user_id = ANY($1::text[]) AND period_start = ANY($2::date[])",
        users,
        periods,
        timeout=60.0,
    )
    return {(r["user_id"], r["period_start"]): r["spent_usd"] for r in rows}


async def database_facts(dsn: str) -> dict[str, Any]:
    """PostgreSQL version and table sizes, for the results."""
    conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT)
    try:
        version = await conn.fetchval("SELECT version()", timeout=10.0)
        ledger_rows_estimate = await conn.fetchval(
            "SELECT reltuples::bigint FROM pg_class WHERE relname = 'usage_ledger'", timeout=10.0
        )
        size = await conn.fetchval(
            "SELECT pg_size_pretty(pg_database_size(current_database()))", timeout=60.0
        )
    finally:
        await conn.close()
    return {"postgres": version, "ledger_rows_estimate": ledger_rows_estimate, "database_size": size}
