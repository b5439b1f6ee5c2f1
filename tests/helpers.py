"""Small helpers shared by the integration tests."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
from google.rpc import error_details_pb2, status_pb2

from broker.app import open_runtime, serving
from broker.clock import Clock
from broker.sandbox import Sandbox

if TYPE_CHECKING:
    from tests.conftest import Broker

STATUS_DETAILS_KEY = "grpc-status-details-bin"


def rich_status(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    for key, value in error.trailing_metadata() or ():
        if key == STATUS_DETAILS_KEY:
            status = status_pb2.Status()
            status.ParseFromString(value)
            return status
    raise AssertionError(f"no rich status on {error.code()} {error.details()}")


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    for detail in rich_status(error).details:
        info = error_details_pb2.ErrorInfo()
        if detail.Is(info.DESCRIPTOR):
            detail.Unpack(info)
            return info
    raise AssertionError("no ErrorInfo detail")


def detail_of(error: grpc.aio.AioRpcError, message_type: type) -> object | None:
    for detail in rich_status(error).details:
        message = message_type()
        if detail.Is(message.DESCRIPTOR):
            detail.Unpack(message)
            return message
    return None


def assert_rpc_error(
    error: grpc.aio.AioRpcError, code: grpc.StatusCode, reason: str
) -> error_details_pb2.ErrorInfo:
    assert error.code() == code, (error.code(), error.details())
    info = error_info(error)
    assert info.domain == "keybroker"
    assert info.reason == reason, (info.reason, error.details())
    return info


def bad_request_fields(error: grpc.aio.AioRpcError) -> list[str]:
    """The field names of the BadRequest detail (empty when there is none)."""
    bad = detail_of(error, error_details_pb2.BadRequest)
    return [] if bad is None else [v.field for v in bad.field_violations]  # type: ignore[attr-defined]


def assert_invalid_argument(error: grpc.aio.AioRpcError, field: str) -> None:
    """INVALID_ARGUMENT with ErrorInfo reason INVALID_ARGUMENT and a BadRequest naming `field`."""
    assert_rpc_error(error, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert bad_request_fields(error) == [field], (bad_request_fields(error), error.details())


def assert_never_unknown_or_internal(error: grpc.aio.AioRpcError) -> None:
    assert error.code() not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), (
        error.code(),
        error.details(),
    )


async def eventually(
    condition: Callable[[], Awaitable[bool]], timeout: float = 10.0, interval: float = 0.05
) -> None:
    """Poll `condition` until it holds; fail after `timeout` seconds (a bounded wait, not a sleep)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


BROKER_TABLES = (
    "users", "api_keys", "usage_periods", "reservations", "usage_ledger", "audit_log", "caller_tokens",
)  # fmt: skip


async def row_counts(conn: asyncpg.Connection) -> dict[str, int]:
    """Rows in every table the broker writes."""
    return {table: await conn.fetchval(f"SELECT count(*) FROM {table}") for table in BROKER_TABLES}  # noqa: S608


# Every table a key-broker RPC may write (caller tokens excepted: no RPC writes them).
RPC_TABLES = (
    "users", "api_keys", "usage_periods", "reservations", "usage_ledger", "audit_log", "key_events",
    "key_intents",
)  # fmt: skip


async def table_counts(conn: asyncpg.Connection, tables: tuple[str, ...] = RPC_TABLES) -> dict[str, int]:
    """Rows in each of `tables`, read in one statement (one consistent snapshot)."""
    # Table names are constants of this module, never input.
    columns = ", ".join(f"(SELECT count(*) FROM {table}) AS {table}" for table in tables)  # noqa: S608
    row = await conn.fetchrow(f"SELECT {columns}")
    return dict(row)


# Rows no RPC writes: leader leases of background work, and the migrations' own bookkeeping.
NOT_RPC_TABLES = frozenset({"leases", "schema_migrations"})


async def written_tables(conn: asyncpg.Connection) -> tuple[str, ...]:
    """Every table an RPC may write: at least RPC_TABLES, and any table added since."""
    names = await conn.fetch(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1"
    )
    tables = tuple(row["table_name"] for row in names if row["table_name"] not in NOT_RPC_TABLES)
    assert set(RPC_TABLES) <= set(tables), set(RPC_TABLES) - set(tables)
    return tables


@contextlib.asynccontextmanager
async def fresh_database(admin_url: str) -> AsyncIterator[str]:
    """A new database cloned from the migrated template (for fixtures wider than one test)."""
    from tests.conftest import TEMPLATE, url_for_database

    name = f"kbtest_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
    finally:
        await conn.close()
    try:
        yield url_for_database(admin_url, name)
    finally:
        conn = await asyncpg.connect(admin_url)
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await conn.close()


@contextlib.asynccontextmanager
async def running_broker(
    database_url: str, sandbox: Sandbox, data_dir: Path, clock: Clock | None = None, **overrides: object
) -> AsyncIterator[Broker]:
    """A broker built as the `broker` fixture builds it, with other settings (any scope). Its tokens
    have names of their own, so several brokers can share one database."""
    from tests.conftest import Broker, TestClock, broker_settings

    settings = broker_settings(database_url, sandbox, data_dir, **overrides)
    suffix = uuid.uuid4().hex[:8]
    async with open_runtime(settings, clock or TestClock()) as runtime, serving(runtime) as server:
        admin = await runtime.authority.create(f"test-admin-{suffix}", "admin", "test")
        agent = await runtime.authority.create(f"test-agent-{suffix}", "agent", "test")
        target = f"127.0.0.1:{server.port}"
        async with grpc.aio.insecure_channel(target) as channel:
            yield Broker(runtime, server, target, channel, admin.token, agent.token)


async def stream_outcome(call: Any, quiet_seconds: float = 0.5) -> grpc.aio.AioRpcError | None:
    """How a server-streaming call starts: its error, or None once it is open (initial metadata came
    and no error followed within `quiet_seconds`, or a message arrived). Cancels the call."""
    try:
        await asyncio.wait_for(call.initial_metadata(), 60)
        try:
            await asyncio.wait_for(call.read(), quiet_seconds)
        except TimeoutError:
            pass
        return None
    except grpc.aio.AioRpcError as error:
        return error
    finally:
        call.cancel()
