"""The domain error tree, and the one table that maps it to a gRPC status with rich details.

Domain code raises these; only the gRPC layer turns them into statuses (``to_rpc_status``). Messages
are short English sentences that never contain SQL, stack traces or secrets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from broker.money import format_usd

DOMAIN = "keybroker"


class KeybrokerError(Exception):
    """Base of every error the broker reports to a caller."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"

    def __init__(self, message: str, **metadata: str) -> None:
        super().__init__(message)
        self.message = message
        self.metadata: dict[str, str] = dict(metadata)


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class InvalidArgument(KeybrokerError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    def __init__(self, field_name: str, description: str) -> None:
        super().__init__(f"{field_name}: {description}", field=field_name)
        self.violations = [FieldViolation(field_name, description)]


class NoApiKey(KeybrokerError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "NO_API_KEY"

    def __init__(self, user_id: str) -> None:
        super().__init__(f"user {user_id} has no API key", user_id=user_id)


class MonthlyLimitExceeded(KeybrokerError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "MONTHLY_LIMIT_EXCEEDED"

    def __init__(self, user_id: str, limit_usd: Decimal, usage_usd: Decimal) -> None:
        super().__init__(
            "the user's monthly limit is used up",
            user_id=user_id,
            limit_usd=format_usd(limit_usd),
            usage_usd=format_usd(usage_usd),
        )
        self.user_id = user_id


class RateLimited(KeybrokerError):
    """The user's requests-per-minute limit is used up until the next minute."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RATE_LIMITED"

    def __init__(self, user_id: str, retry_after_seconds: float) -> None:
        super().__init__("the user's request rate limit is used up; retry later", user_id=user_id)
        self.retry_after_seconds = retry_after_seconds


class KeyDisabled(KeybrokerError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "KEY_DISABLED"

    def __init__(self, user_id: str, why: str = "the user's key is disabled") -> None:
        super().__init__(why, user_id=user_id)


class KeyExists(KeybrokerError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "KEY_EXISTS"

    def __init__(self, user_id: str) -> None:
        super().__init__("the user already has a key", user_id=user_id)


class ConcurrentRotation(KeybrokerError):
    code = grpc.StatusCode.ABORTED
    reason = "CONCURRENT_ROTATION"

    def __init__(self, user_id: str) -> None:
        super().__init__("another rotation of this key finished first; retry", user_id=user_id)


class RequestInProgress(KeybrokerError):
    code = grpc.StatusCode.ABORTED
    reason = "REQUEST_IN_PROGRESS"

    def __init__(self, user_id: str) -> None:
        super().__init__("a request with this request_id is still in progress; retry", user_id=user_id)


class Unauthenticated(KeybrokerError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDenied(KeybrokerError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class UserBindingFailed(PermissionDenied):
    """End-user binding is on and the call's `x-user-jwt` is missing, invalid or for another user.
    The message says which check failed and never contains the token."""

    reason = "USER_BINDING_FAILED"


class Unavailable(KeybrokerError):
    """A dependency is down; the caller may retry after ``retry_after_seconds``."""

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, message: str, retry_after_seconds: float = 1.0, **metadata: str) -> None:
        super().__init__(message, **metadata)
        self.retry_after_seconds = retry_after_seconds


class DatabaseUnavailable(Unavailable):
    reason = "DATABASE_UNAVAILABLE"


class ProviderError(KeybrokerError):
    """Base of failures talking to OpenRouter's key-management API."""

    def __init__(self, message: str, http_status: int | None = None, **metadata: str) -> None:
        if http_status is not None:
            metadata["http_status"] = str(http_status)
        super().__init__(message, **metadata)
        self.http_status = http_status


class ProviderUnavailable(ProviderError, Unavailable):
    """Transport error, timeout, 429 or 5xx: safe to retry later."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "PROVIDER_UNAVAILABLE"

    def __init__(
        self, message: str, http_status: int | None = None, retry_after_seconds: float = 1.0
    ) -> None:
        ProviderError.__init__(self, message, http_status)
        self.retry_after_seconds = retry_after_seconds


class ProviderRejected(ProviderError):
    """OpenRouter refused the request for good (401/402/403 on the management key, 400)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "PROVIDER_REJECTED"


class ProviderKeyNotFound(ProviderError):
    """OpenRouter has no key with that hash (404)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "PROVIDER_KEY_NOT_FOUND"


@dataclass(frozen=True)
class RpcStatus:
    """What the gRPC layer sends: code, message and the packed google.rpc.Status."""

    code: grpc.StatusCode
    message: str
    details: status_pb2.Status = field(repr=False)


def to_rpc_status(error: KeybrokerError) -> RpcStatus:
    """The one translation from a domain error to a gRPC status with rich details."""
    details: list[any_pb2.Any] = [
        _pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=error.metadata))
    ]
    if isinstance(error, InvalidArgument):
        violations = [
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in error.violations
        ]
        details.append(_pack(error_details_pb2.BadRequest(field_violations=violations)))
    if isinstance(error, MonthlyLimitExceeded):
        violation = error_details_pb2.QuotaFailure.Violation(
            subject=f"user:{error.user_id}", description=error.message
        )
        details.append(_pack(error_details_pb2.QuotaFailure(violations=[violation])))
    if isinstance(error, (Unavailable, RateLimited)):
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after_seconds * 1e9))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    status = status_pb2.Status(code=_CODE_NUMBERS[error.code], message=error.message, details=details)
    return RpcStatus(error.code, error.message, status)


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


_CODE_NUMBERS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: code_pb2.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND: code_pb2.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED: code_pb2.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION: code_pb2.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS: code_pb2.ALREADY_EXISTS,
    grpc.StatusCode.ABORTED: code_pb2.ABORTED,
    grpc.StatusCode.UNAUTHENTICATED: code_pb2.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED: code_pb2.PERMISSION_DENIED,
    grpc.StatusCode.UNAVAILABLE: code_pb2.UNAVAILABLE,
    grpc.StatusCode.INTERNAL: code_pb2.INTERNAL,
}
