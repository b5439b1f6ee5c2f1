"""Small helpers shared by the integration tests."""

from __future__ import annotations

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


def assert_rpc_error(error: grpc.aio.AioRpcError, code: grpc.StatusCode, reason: str) -> error_details_pb2.ErrorInfo:
    assert error.code() == code, (error.code(), error.details())
    info = error_info(error)
    assert info.domain == "keybroker"
    assert info.reason == reason, (info.reason, error.details())
    return info
