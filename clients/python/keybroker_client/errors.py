"""The client's error tree and the one place that turns a failed RPC into it.

The broker answers errors with a gRPC status whose ``grpc-status-details-bin`` trailer carries a
``google.rpc.Status`` with ``ErrorInfo`` (the machine-readable ``reason``) and, where they fit,
``BadRequest``, ``QuotaFailure`` and ``RetryInfo``. ``from_rpc_error`` reads those details and picks
the exception class by ``reason`` first and by status code second, so callers catch meaning
(``NoApiKeyError``) rather than transport codes. No message here ever carries a secret.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

import grpc
from google.protobuf.message import DecodeError

# googleapis-common-protos ships .pyi files but no py.typed marker.
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped, unused-ignore]

__all__ = [
    "AuthenticationError",
    "BudgetExceededError",
    "InvalidArgumentError",
    "KeyDisabledError",
    "KeyExistsError",
    "KeybrokerClientError",
    "MonthlyLimitExceededError",
    "NoApiKeyError",
    "OpenRouterError",
    "PermissionDeniedError",
    "UnavailableError",
    "from_rpc_error",
]

STATUS_DETAILS_KEY = "grpc-status-details-bin"
_REDACTED = "[redacted]"


class KeybrokerClientError(Exception):
    """A broker call failed; ``reason`` is the broker's UPPER_SNAKE reason (or the code's name)."""

    def __init__(
        self,
        code: grpc.StatusCode,
        reason: str,
        message: str,
        *,
        metadata: Mapping[str, str] | None = None,
        field_violations: Sequence[tuple[str, str]] = (),
        quota_violations: Sequence[tuple[str, str]] = (),
        retry_after: float | None = None,
        domain: str = "",
    ) -> None:
        super().__init__(f"{code.name} {reason}: {message}" if message else f"{code.name} {reason}")
        self.code: grpc.StatusCode = code
        self.reason: str = reason
        self.message: str = message
        self.metadata: dict[str, str] = dict(metadata or {})
        self.field_violations: list[tuple[str, str]] = list(field_violations)
        self.quota_violations: list[tuple[str, str]] = list(quota_violations)
        self.retry_after: float | None = retry_after
        self.domain: str = domain

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code.name}, reason={self.reason!r}, message={self.message!r})"
        )


class NoApiKeyError(KeybrokerClientError):
    """The user has no key (NOT_FOUND, NO_API_KEY): provision one first."""


class MonthlyLimitExceededError(KeybrokerClientError):
    """The user's monthly limit is used up (RESOURCE_EXHAUSTED, MONTHLY_LIMIT_EXCEEDED)."""

    @property
    def limit_usd(self) -> Decimal | None:
        """The user's monthly limit in USD, from the error's metadata."""
        return _decimal_or_none(self.metadata.get("limit_usd"))

    @property
    def usage_usd(self) -> Decimal | None:
        """The user's spend this month in USD, from the error's metadata."""
        return _decimal_or_none(self.metadata.get("usage_usd"))


class BudgetExceededError(MonthlyLimitExceededError):
    """CheckLimit refused the estimated cost of a call (``allowed = false``); nothing was reserved.

    Raised by ``openrouter_chat`` before anything is sent to OpenRouter. It is a
    ``MonthlyLimitExceededError`` so one ``except`` covers every "out of budget" answer.
    """

    def __init__(self, user_id: str, estimated_cost_usd: Decimal, **metadata: str) -> None:
        super().__init__(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "MONTHLY_LIMIT_EXCEEDED",
            "the estimated cost exceeds the user's remaining monthly budget",
            metadata={"user_id": user_id, "estimated_cost_usd": format(estimated_cost_usd, "f"), **metadata},
            domain="keybroker",
        )
        self.user_id = user_id
        self.estimated_cost_usd = estimated_cost_usd


class KeyDisabledError(KeybrokerClientError):
    """The key is disabled, revoked or rejected by OpenRouter (FAILED_PRECONDITION, KEY_DISABLED)."""


class KeyExistsError(KeybrokerClientError):
    """ProvisionKey for a user who already has a key (ALREADY_EXISTS, KEY_EXISTS)."""


class InvalidArgumentError(KeybrokerClientError):
    """A malformed request; ``field_violations`` names each offending field."""


class AuthenticationError(KeybrokerClientError):
    """No or bad caller token (UNAUTHENTICATED)."""


class PermissionDeniedError(KeybrokerClientError):
    """The caller token's scope does not reach the RPC (PERMISSION_DENIED)."""


class UnavailableError(KeybrokerClientError):
    """The broker or one of its dependencies is unreachable, or the deadline passed: retry later.

    ``retry_after`` (seconds) is the broker's hint when it sent one.
    """


class OpenRouterError(Exception):
    """OpenRouter answered a chat completion with a non-2xx status, or could not be reached.

    ``status`` is the HTTP status (``None`` when no response arrived); ``message`` is OpenRouter's
    error message. Neither ever contains the API key.
    """

    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(
            f"OpenRouter {status}: {message}" if status is not None else f"OpenRouter: {message}"
        )
        self.status = status
        self.message = message

    def __repr__(self) -> str:
        return f"OpenRouterError(status={self.status!r}, message={self.message!r})"


_BY_REASON: dict[str, type[KeybrokerClientError]] = {
    "NO_API_KEY": NoApiKeyError,
    "MONTHLY_LIMIT_EXCEEDED": MonthlyLimitExceededError,
    "KEY_DISABLED": KeyDisabledError,
    "KEY_EXISTS": KeyExistsError,
    "INVALID_ARGUMENT": InvalidArgumentError,
    "UNAUTHENTICATED": AuthenticationError,
    "PERMISSION_DENIED": PermissionDeniedError,
}

# Used when the reason is unknown or absent (an interceptor, a proxy or gRPC itself answered). Only
# codes with one meaning are here: a bare NOT_FOUND or RESOURCE_EXHAUSTED may come from elsewhere.
_BY_CODE: dict[grpc.StatusCode, type[KeybrokerClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: UnavailableError,
}

# Retrying these is always the caller's call to make, whatever the reason says.
_RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


@dataclass
class _Details:
    """What the rich status carried, in plain Python."""

    reason: str = ""
    domain: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    field_violations: list[tuple[str, str]] = field(default_factory=list)
    quota_violations: list[tuple[str, str]] = field(default_factory=list)
    retry_after: float | None = None


def from_rpc_error(err: grpc.aio.AioRpcError, *, secrets: Iterable[str] = ()) -> KeybrokerClientError:
    """Translate a failed RPC into the matching ``KeybrokerClientError`` subclass.

    Any of ``secrets`` (the caller's bearer token, say) that appears in the server's message is
    replaced, so the exception text can be logged safely.
    """
    code: grpc.StatusCode = err.code()
    details = parse_status_details(err.trailing_metadata())
    reason = details.reason or code.name
    cls = error_class(code, reason)
    return cls(
        code,
        reason,
        redact(err.details() or "", secrets),
        metadata={key: redact(value, secrets) for key, value in details.metadata.items()},
        field_violations=details.field_violations,
        quota_violations=details.quota_violations,
        retry_after=details.retry_after,
        domain=details.domain,
    )


def error_class(code: grpc.StatusCode, reason: str) -> type[KeybrokerClientError]:
    """The exception class for a status code and reason: by reason first, then by code."""
    if code in _RETRYABLE_CODES:
        return UnavailableError
    return _BY_REASON.get(reason) or _BY_CODE.get(code) or KeybrokerClientError


def parse_status_details(trailing_metadata: Any) -> _Details:
    """Read ErrorInfo, BadRequest, QuotaFailure and RetryInfo from the status-details trailer.

    A missing or unreadable trailer yields empty details: error translation must never fail.
    """
    status = _rich_status(trailing_metadata)
    details = _Details()
    if status is None:
        return details
    for packed in status.details:
        if packed.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            packed.Unpack(info)
            details.reason, details.domain = info.reason, info.domain
            details.metadata.update(info.metadata)
        elif packed.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            packed.Unpack(bad)
            details.field_violations += [(v.field, v.description) for v in bad.field_violations]
        elif packed.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            quota = error_details_pb2.QuotaFailure()
            packed.Unpack(quota)
            details.quota_violations += [(v.subject, v.description) for v in quota.violations]
        elif packed.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            packed.Unpack(retry)
            details.retry_after = retry.retry_delay.ToNanoseconds() / 1e9
    return details


def _rich_status(trailing_metadata: Any) -> status_pb2.Status | None:
    for key, value in trailing_metadata or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            try:
                return status_pb2.Status.FromString(value)
            except DecodeError:
                return None
    return None


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every non-empty secret replaced by a marker."""
    for secret in secrets:
        if secret and secret in text:
            text = text.replace(secret, _REDACTED)
    return text


def _decimal_or_none(value: str | None) -> Decimal | None:
    if not value:
        return None
    try:
        return Decimal(value)
    except InvalidOperation:
        return None
