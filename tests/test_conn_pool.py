"""The lean connection pool (broker/conn_pool.py) on a real PostgreSQL: bounds, waiting,
deadlines, cancellation, connections in an unknown state, idle ageing and close."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest

from broker.conn_pool import ConnectionPool, PoolClosed
from tests.conftest import Broker
from tests.helpers import eventually

MakePool = Callable[..., Awaitable[ConnectionPool]]


@pytest.fixture
async def make_pool(database_url: str) -> AsyncIterator[MakePool]:
    pools: list[ConnectionPool] = []

    async def make(min_size: int = 0, max_size: int = 3, max_idle_seconds: float = 60.0) -> ConnectionPool:
        async def connect() -> asyncpg.Connection:
            return await asyncpg.connect(database_url, timeout=10)

        pool = ConnectionPool(connect, min_size, max_size, max_idle_seconds)
        await pool.start()
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        await pool.close(grace_seconds=5)


async def backend_pid(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT pg_backend_pid()"))


async def test_never_more_than_max_size_connections_and_every_caller_is_served(make_pool: MakePool) -> None:
    pool = await make_pool(max_size=3)
    in_use = peak = 0
    pids: set[int] = set()

    async def work() -> None:
        nonlocal in_use, peak
        conn = await pool.acquire(10)
        in_use += 1
        peak = max(peak, in_use)
        try:
            pids.add(await backend_pid(conn))
            await conn.fetchval("SELECT pg_sleep(0.01)")
        finally:
            in_use -= 1
            pool.release(conn)

    await asyncio.gather(*(work() for _ in range(30)))
    assert peak == 3 and pool.get_size() == 3 and pool.get_idle_size() == 3
    assert len(pids) == 3  # the same three sessions were reused


async def test_min_size_connections_are_open_at_start(make_pool: MakePool) -> None:
    pool = await make_pool(min_size=2, max_size=4)
    assert pool.get_size() == 2 and pool.get_idle_size() == 2


async def test_a_waiter_gives_up_after_its_deadline(make_pool: MakePool) -> None:
    pool = await make_pool(max_size=1)
    held = await pool.acquire(5)
    with pytest.raises(TimeoutError):
        await pool.acquire(0.05)
    pool.release(held)
    again = await pool.acquire(5)  # the timed-out waiter left nothing behind
    assert again is held
    pool.release(again)


async def test_a_connection_given_back_as_not_reusable_is_replaced_for_the_next_waiter(
    make_pool: MakePool,
) -> None:
    pool = await make_pool(max_size=1)
    first = await pool.acquire(5)
    first_pid = await backend_pid(first)
    waiting = asyncio.ensure_future(pool.acquire(10))
    await asyncio.sleep(0)  # let it queue
    assert not waiting.done()
    pool.release(first, reusable=False)
    second = await waiting
    assert first.is_closed() and second is not first
    assert await backend_pid(second) != first_pid
    assert pool.get_size() == 1
    pool.release(second)


async def test_a_connection_left_inside_a_transaction_is_not_reused(make_pool: MakePool) -> None:
    pool = await make_pool(max_size=2)
    conn = await pool.acquire(5)
    await conn.execute("BEGIN")
    pool.release(conn)
    await eventually(_closed(conn))  # closed in the background, never handed out again
    assert pool.get_size() == 0
    fresh = await pool.acquire(5)
    assert not fresh.is_in_transaction()
    pool.release(fresh)


async def test_a_cancelled_waiter_leaks_no_connection(make_pool: MakePool) -> None:
    pool = await make_pool(max_size=2)
    a, b = await pool.acquire(5), await pool.acquire(5)
    waiter = asyncio.ensure_future(pool.acquire(10))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    pool.release(a)
    pool.release(b)
    both = [await pool.acquire(1), await pool.acquire(1)]  # both connections are still there
    assert {id(c) for c in both} == {id(a), id(b)}
    for conn in both:
        pool.release(conn)


async def test_a_connection_that_died_while_idle_is_skipped(make_pool: MakePool, database_url: str) -> None:
    pool = await make_pool(max_size=2)
    conn = await pool.acquire(5)
    pid = await backend_pid(conn)
    pool.release(conn)
    killer = await asyncpg.connect(database_url)
    try:
        assert await killer.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await killer.close()
    await eventually(_closed(conn))  # the client side has seen the server close the socket
    fresh = await pool.acquire(5)
    assert fresh is not conn and await fresh.fetchval("SELECT 1") == 1
    pool.release(fresh)


async def test_idle_connections_beyond_min_size_age_out(make_pool: MakePool) -> None:
    pool = await make_pool(min_size=1, max_size=3, max_idle_seconds=0.0)
    conns = [await pool.acquire(5) for _ in range(3)]
    for conn in conns:
        pool.release(conn)
    # Each release closes the longest-idle connection while more than min_size are open.
    await eventually(lambda: _equals(_size(pool), 1))
    assert pool.get_idle_size() == 1 and not conns[-1].is_closed()


async def test_close_waits_for_connections_in_use_then_refuses_work(make_pool: MakePool) -> None:
    pool = await make_pool(max_size=2)
    busy = await pool.acquire(5)
    idle = await pool.acquire(5)
    pool.release(idle)
    closing = asyncio.ensure_future(pool.close(grace_seconds=10))
    await asyncio.sleep(0)  # let close() begin
    with pytest.raises(PoolClosed):
        await pool.acquire(1)
    assert not closing.done()
    pool.release(busy)
    await closing
    assert busy.is_closed() and idle.is_closed() and pool.get_size() == 0


async def test_a_statement_cancelled_mid_flight_is_stopped_and_its_session_not_reused(broker: Broker) -> None:
    db = broker.runtime.db
    observer = await broker.db()

    async def sleeping_sessions() -> list[int]:
        rows = await observer.fetch("SELECT pid FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)'")
        return [row["pid"] for row in rows]

    async def session_exists(pid: int) -> bool:
        return bool(await observer.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid))

    try:
        running = asyncio.ensure_future(db.fetchval("SELECT pg_sleep(30)"))
        await eventually(lambda: _equals(_count(sleeping_sessions()), 1))
        [pid] = await sleeping_sessions()
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        await eventually(lambda: _equals(_count(sleeping_sessions()), 0))  # stopped on the server
        await eventually(lambda: _not(session_exists(pid)))  # and that session closed
        assert await db.fetchval("SELECT 41 + 1") == 42
    finally:
        await observer.close()


async def _size(pool: ConnectionPool) -> int:
    return pool.get_size()


async def _count(rows: Awaitable[list[int]]) -> int:
    return len(await rows)


async def _not(value: Awaitable[bool]) -> bool:
    return not await value


async def _equals(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


def _closed(conn: asyncpg.Connection) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return conn.is_closed()

    return check


async def test_a_failed_start_keeps_what_it_opened_idle_so_close_does_not_wait(database_url: str) -> None:
    opened: list[asyncpg.Connection] = []

    async def connect_once() -> asyncpg.Connection:
        if opened:
            raise OSError("refused")  # the second connection fails
        opened.append(await asyncpg.connect(database_url, timeout=10))
        return opened[0]

    pool = ConnectionPool(connect_once, min_size=2, max_size=3)
    with pytest.raises(OSError):
        await pool.start()
    assert pool.get_size() == 1 and pool.get_idle_size() == 1  # not counted as in use
    await pool.close(grace_seconds=30)
    assert opened[0].is_closed() and pool.get_size() == 0
