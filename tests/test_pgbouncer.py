"""The broker behind Debian's PgBouncer in transaction mode (issue 6, item 5).

A pgbouncer process (started here, on a free 127.0.0.1 port) sits between the broker and the test
server: every statement may run on a different server connection, so anything that relied on
session state would break. Covered: migrations, provisioning, GetKey, reservations and RecordUsage
under concurrency with exact sums, WatchKeys (LISTEN cannot work: the hub falls back to polling),
and the background-task leases.

Before PgBouncer 1.21 asyncpg's named prepared statements do break (shown below), hence
KEYBROKER_DB_STATEMENT_CACHE_SIZE=0; from 1.21 on, with max_prepared_statements, the default cache
is tested too.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import grpc
import pytest
from keybroker.v1 import keybroker_pb2 as pb

from bench import pgbouncer
from broker.app import open_runtime, serving
from broker.clock import system_clock
from broker.leases import Leases
from broker.migrations import discover, migrate
from broker.sandbox import Sandbox
from tests.conftest import Broker, TestClock, broker_settings, url_for_database

BINARY = pgbouncer.find_binary()
pytestmark = pytest.mark.skipif(
    BINARY is None, reason="pgbouncer is not installed (apt-get install -y pgbouncer; .ci/run does it)"
)
VERSION = pgbouncer.version(BINARY) if BINARY else (0, 0, 0)
NEW_ENOUGH = pgbouncer.supports_prepared_statements(VERSION)
# Statement cache sizes to run the broker with: 0 always; asyncpg's default only where PgBouncer
# tracks prepared statements itself.
CACHE_MODES = [
    pytest.param(0, id="statement-cache-0"),
    pytest.param(
        1024,
        id="statement-cache-on",
        marks=pytest.mark.skipif(
            not NEW_ENOUGH,
            reason=f"PgBouncer {'.'.join(map(str, VERSION))} < 1.21 has no max_prepared_statements",
        ),
    ),
]


@pytest.fixture(scope="module")
async def bouncer(pg_admin_url: str) -> AsyncIterator[pgbouncer.PgBouncer]:
    started = await asyncio.to_thread(pgbouncer.start, pg_admin_url, binary=BINARY)
    yield started
    await asyncio.to_thread(started.stop)


def through(bouncer: pgbouncer.PgBouncer, database_url: str) -> str:
    """The same database, reached through PgBouncer."""
    return bouncer.dsn(urlsplit(database_url).path.lstrip("/"))


@pytest.fixture(params=CACHE_MODES)
async def bounced(
    request: pytest.FixtureRequest,
    bouncer: pgbouncer.PgBouncer,
    database_url: str,
    sandbox: Sandbox,
    clock: TestClock,
    tmp_path: Path,
) -> AsyncIterator[Broker]:
    """The broker in-process, its pool (and LISTEN connection) going through PgBouncer."""
    settings = broker_settings(
        through(bouncer, database_url),
        sandbox,
        tmp_path,
        db_statement_cache_size=request.param,
        event_poll_interval=timedelta(milliseconds=200),
    )
    async with open_runtime(settings, clock) as runtime, serving(runtime) as server:
        admin = await runtime.authority.create("test-admin", "admin", "test")
        agent = await runtime.authority.create("test-agent", "agent", "test")
        target = f"127.0.0.1:{server.port}"
        async with grpc.aio.insecure_channel(target) as channel:
            yield Broker(runtime, server, target, channel, admin.token, agent.token)


async def test_migrations_apply_once_through_pgbouncer(
    bouncer: pgbouncer.PgBouncer, pg_admin_url: str
) -> None:
    name = f"kbpgb_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(pg_admin_url)
    await admin.execute(f"CREATE DATABASE {name}")
    try:
        dsn = bouncer.dsn(name)
        conns = [await asyncpg.connect(dsn, statement_cache_size=0) for _ in range(2)]
        try:
            # Two replicas starting together: the transaction-level advisory lock serialises them.
            applied = await asyncio.gather(*(migrate(conn) for conn in conns))
            assert sorted(len(names) for names in applied) == [0, len(discover())]
            assert await migrate(conns[0]) == []
        finally:
            for conn in conns:
                await conn.close()
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


async def test_money_path_is_exact_under_concurrency_through_pgbouncer(bounced: Broker) -> None:
    broker = bounced
    await broker.provision("pgb-user", limit="10")
    key = await broker.agent.GetKey(pb.GetKeyRequest(user_id="pgb-user"), metadata=broker.as_agent())
    assert key.api_key.startswith("sk-or-v1-") and key.limit_usd == "10"

    checks = await asyncio.gather(
        *(
            broker.agent.CheckLimit(
                pb.CheckLimitRequest(user_id="pgb-user", estimated_cost_usd="0.1", request_id=f"chk-{i}"),
                metadata=broker.as_agent(),
                timeout=30,
            )
            for i in range(150)
        )
    )
    allowed = [(i, r) for i, r in enumerate(checks) if r.allowed]
    assert len(allowed) == 100, "exactly $10 / $0.10 reservations fit"

    def record(request_id: str, cost: str, reservation: str = "") -> pb.RecordUsageRequest:
        return pb.RecordUsageRequest(
            user_id="pgb-user", request_id=request_id, reservation_id=reservation, model="m", cost_usd=cost
        )

    settled = [record(f"chk-{i}", "0.05", r.reservation_id) for i, r in allowed]
    loose = [record(f"gen-{i}", "0.01") for i in range(50)]
    replies = await asyncio.gather(
        *(
            broker.agent.RecordUsage(request, metadata=broker.as_agent(), timeout=30)
            for request in [*settled, *loose, *loose]  # every loose one twice, concurrently
        )
    )
    assert sum(r.duplicate for r in replies) == 50
    after = await broker.agent.CheckLimit(
        pb.CheckLimitRequest(user_id="pgb-user"), metadata=broker.as_agent()
    )
    assert Decimal(after.spent_usd) == Decimal("5.50")
    assert Decimal(after.reserved_usd) == 0 and Decimal(after.remaining_usd) == Decimal("4.50")
    summary = await broker.admin.GetUsageSummary(
        pb.GetUsageSummaryRequest(user_id="pgb-user"), metadata=broker.as_admin()
    )
    assert summary.total_requests == 150 and Decimal(summary.total_cost_usd) == Decimal("5.50")


async def test_watch_keys_works_by_polling_through_pgbouncer(
    bounced: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="keybroker.events")
    broker = bounced
    await broker.provision("pgb-watched")
    stream = broker.agent.WatchKeys(
        pb.WatchKeysRequest(user_ids=["pgb-watched"]), metadata=broker.as_agent(), timeout=30
    )
    await stream.initial_metadata()
    await broker.admin.UpdateKey(
        pb.UpdateKeyRequest(user_id="pgb-watched", disabled=True), metadata=broker.as_admin()
    )
    reply = await asyncio.wait_for(stream.read(), 10)
    assert reply.event.user_id == "pgb-watched"
    stream.cancel()

    async def fell_back() -> None:
        while True:
            if "notifications do not arrive" in caplog.text:
                return
            await asyncio.sleep(0.1)

    await asyncio.wait_for(fell_back(), 15)  # the NOTIFY self-test gives up after 5 s
    assert not broker.server.events.listening


async def test_leases_hold_through_pgbouncer(bounced: Broker) -> None:
    db = bounced.runtime.db
    first, second = Leases(db, system_clock, "replica-a"), Leases(db, system_clock, "replica-b")
    assert await first.hold("pgb-task", timedelta(seconds=30))
    assert not await second.hold("pgb-task", timedelta(seconds=30))
    assert await first.hold("pgb-task", timedelta(seconds=30)), "the holder renews"
    await first.release("pgb-task")
    assert await second.hold("pgb-task", timedelta(seconds=30))


@pytest.mark.skipif(NEW_ENOUGH, reason="PgBouncer >= 1.21 supports prepared statements")
async def test_named_prepared_statements_break_before_pgbouncer_1_21(
    bouncer: pgbouncer.PgBouncer, pg_admin_url: str
) -> None:
    """Why KEYBROKER_DB_STATEMENT_CACHE_SIZE=0 is needed here: asyncpg's default cache prepares
    named statements on one server connection and PgBouncer runs the next call on another."""
    dsn = through(bouncer, url_for_database(pg_admin_url, "postgres"))
    failures: list[BaseException] = []
    for cache in (100, 0):
        pool = await asyncpg.create_pool(dsn, min_size=4, max_size=4, statement_cache_size=cache)
        try:
            results = await asyncio.gather(
                *(pool.fetchval(f"SELECT $1::int + {i % 5}", i) for i in range(200)),
                return_exceptions=True,
            )
        finally:
            await pool.close()
        failures = [r for r in results if isinstance(r, BaseException)]
        if cache:
            assert failures, "named prepared statements should fail through transaction pooling"
            assert all(isinstance(f, asyncpg.InvalidSQLStatementNameError) for f in failures)
        else:
            assert not failures
