"""The asyncpg pool, and the one place where driver failures become domain errors."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import asyncpg

from broker.config import Settings
from broker.conn_pool import ConnectionPool
from broker.errors import DatabaseUnavailable

log = logging.getLogger("keybroker.db")
T = TypeVar("T")

# Failures that mean "the database cannot be reached or is going away": the caller gets
# UNAVAILABLE (DATABASE_UNAVAILABLE) and may retry.
UNREACHABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.OperatorInterventionError,
    asyncpg.InsufficientResourcesError,
    asyncpg.QueryCanceledError,
    # A connection cut in the middle of an operation can leave the driver's protocol state
    # inconsistent; asyncpg then refuses the connection with this error.
    asyncpg.InternalClientError,
)
# Failures that a retry of the same transaction resolves.
RETRYABLE: tuple[type[BaseException], ...] = (
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
)
MAX_ATTEMPTS = 4


class Database:
    """A bounded pool with deadlines; every call maps driver failures to DatabaseUnavailable."""

    def __init__(self, pool: ConnectionPool, acquire_timeout: float) -> None:
        self.pool = pool
        self.acquire_timeout = acquire_timeout
        self._dedicated: Callable[[], Awaitable[asyncpg.Connection]] | None = None

    @classmethod
    async def connect(cls, dsn: str, settings: Settings) -> Database:
        async def open_connection() -> asyncpg.Connection:
            return await asyncpg.connect(
                dsn,
                timeout=settings.db_connect_timeout,
                command_timeout=settings.db_command_timeout,
                statement_cache_size=settings.db_statement_cache_size,  # PgBouncer < 1.21: 0
                server_settings={"application_name": "keybroker"},
            )

        # No session state is ever left on a pooled connection (every statement is its own
        # transaction; locks are transaction-level; LISTEN uses its own connection), so a
        # connection goes back to the pool as it is, without a reset query.
        pool = ConnectionPool(open_connection, settings.db_pool_min, settings.db_pool_max)
        try:
            await pool.start()
        except UNREACHABLE as exc:
            await pool.close()
            raise DatabaseUnavailable(f"cannot connect to the database ({type(exc).__name__})") from exc
        database = cls(pool, acquire_timeout=settings.db_command_timeout)
        database._dedicated = open_connection
        return database

    async def connect_dedicated(self) -> asyncpg.Connection:
        """A connection of its own, outside the pool (LISTEN needs a session that stays put).
        The caller closes it. Driver failures are left to the caller, which decides on retries."""
        if self._dedicated is None:
            raise DatabaseUnavailable("this database handle cannot open dedicated connections")
        return await self._dedicated()

    async def close(self) -> None:
        await self.pool.close()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        async with translate_errors():
            conn = await self.pool.acquire(self.acquire_timeout)
            try:
                yield conn
            except BaseException as error:
                self.pool.release(conn, reusable_after(error))
                raise
            self.pool.release(conn)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[asyncpg.Connection]:
        async with self.connection() as conn, conn.transaction():
            yield conn

    async def fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        return await self.retrying(lambda conn: conn.fetchrow(sql, *args))

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        return await self.retrying(lambda conn: conn.fetch(sql, *args))

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self.retrying(lambda conn: conn.fetchval(sql, *args))

    async def execute(self, sql: str, *args: Any) -> str:
        return await self.retrying(lambda conn: conn.execute(sql, *args))

    async def retrying(
        self,
        work: Callable[[asyncpg.Connection], Awaitable[T]],
        retry_on: tuple[type[BaseException], ...] = (),
    ) -> T:
        """Run one statement (or function call) on a pooled connection, retrying the transient
        conflicts (deadlock, serialization, and the caller's own `retry_on`)."""
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                return await self._on_pooled_connection(work)
            except (*RETRYABLE, *retry_on):
                if attempt == MAX_ATTEMPTS:
                    raise DatabaseUnavailable("the database kept aborting the transaction") from None
                await asyncio.sleep(0.005 * attempt)
        raise AssertionError("unreachable")

    async def _on_pooled_connection(self, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """`connection()` without its two generator-based context managers: this is every hot-path
        RPC's way to the database, and those cost ~10 µs of CPU per call (bench, issue 6)."""
        pool = self.pool
        try:
            conn = await pool.acquire(self.acquire_timeout)
            try:
                result = await work(conn)
            except BaseException as error:
                pool.release(conn, reusable_after(error))
                raise
            pool.release(conn)
            return result
        except DatabaseUnavailable:
            raise
        except UNREACHABLE as exc:
            log.warning("database unavailable: %s", type(exc).__name__)
            raise DatabaseUnavailable("the database is unavailable") from exc

    async def ping(self) -> bool:
        try:
            await self.fetchval("SELECT 1")
        except DatabaseUnavailable:
            return False
        return True


# Errors after which a statement may still be running on the connection, or its protocol state is
# unknown: the connection is terminated instead of going back to the pool.
INTERRUPTED: tuple[type[BaseException], ...] = (
    TimeoutError,
    OSError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.PostgresConnectionError,
)


def reusable_after(error: BaseException) -> bool:
    """Whether a connection can be reused after `error` ended the work on it: yes after an SQL
    error or a domain error raised between statements; not after a cancellation, a deadline or a
    connection failure. (The pool also refuses closed connections and open transactions.)"""
    return isinstance(error, Exception) and not isinstance(error, INTERRUPTED)


@asynccontextmanager
async def translate_errors() -> AsyncIterator[None]:
    try:
        yield
    except DatabaseUnavailable:
        raise
    except UNREACHABLE as exc:
        log.warning("database unavailable: %s", type(exc).__name__)
        raise DatabaseUnavailable("the database is unavailable") from exc
