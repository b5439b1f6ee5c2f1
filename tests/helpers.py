"""Small helpers shared by the integration tests."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import asyncpg
import grpc
from google.rpc import error_details_pb2, status_pb2

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
