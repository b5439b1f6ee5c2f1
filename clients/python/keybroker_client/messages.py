"""Build the request messages from plain Python values.

Money goes from ``Decimal`` (or a decimal string) to the proto's decimal string without ever passing
through a binary float; durations go from ``timedelta`` to ``google.protobuf.Duration``; ``None``
leaves an optional field unset.
"""

from __future__ import annotations

import datetime
import uuid
from decimal import Decimal, InvalidOperation

from google.protobuf import duration_pb2
from keybroker.v1 import keybroker_pb2

Money = Decimal | int | str
"""An amount of US dollars: a ``Decimal``, an ``int`` or a decimal string. Never a ``float``."""


def usd(value: Money) -> str:
    """The proto's decimal string for an amount: ``Decimal("1E+1")`` → ``"10"``, never exponents.

    A string is parsed as a decimal (so ``"1e-5"`` becomes ``"0.00001"``); the empty string stays
    empty (UpdateKey reads it as "remove the custom limit"). Floats are refused: they cannot hold
    most cent amounts exactly.
    """
    if isinstance(value, float | bool):
        raise TypeError(f"money must be a Decimal, int or str, not {type(value).__name__}")
    if value == "":
        return ""
    try:
        amount = Decimal(value)
    except InvalidOperation:
        raise ValueError(f"not a decimal amount: {value!r}") from None
    if not amount.is_finite():
        raise ValueError(f"not a finite amount: {value!r}")
    return format(amount, "f")


def duration(value: datetime.timedelta) -> duration_pb2.Duration:
    """A ``google.protobuf.Duration`` equal to ``value`` (microsecond precision)."""
    message = duration_pb2.Duration()
    message.FromTimedelta(value)
    return message


def new_request_id() -> str:
    """A fresh idempotency key."""
    return str(uuid.uuid4())


def get_key_request(user_id: str) -> keybroker_pb2.GetKeyRequest:
    return keybroker_pb2.GetKeyRequest(user_id=user_id)


def check_limit_request(
    user_id: str, *, estimated_cost_usd: Money | None = None, request_id: str | None = None
) -> keybroker_pb2.CheckLimitRequest:
    return keybroker_pb2.CheckLimitRequest(
        user_id=user_id,
        estimated_cost_usd=usd(estimated_cost_usd) if estimated_cost_usd is not None else "",
        request_id=request_id or "",
    )


def record_usage_request(
    user_id: str,
    *,
    request_id: str,
    cost_usd: Money,
    reservation_id: str | None = None,
    model: str = "",
    agent: str = "",
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    total_tokens: int = 0,
    duration_: datetime.timedelta | None = None,
) -> keybroker_pb2.RecordUsageRequest:
    return keybroker_pb2.RecordUsageRequest(
        user_id=user_id,
        request_id=request_id,
        reservation_id=reservation_id or "",
        model=model,
        agent=agent,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=total_tokens,
        cost_usd=usd(cost_usd),
        duration=duration(duration_) if duration_ is not None else None,
    )


def release_reservation_request(user_id: str, reservation_id: str) -> keybroker_pb2.ReleaseReservationRequest:
    return keybroker_pb2.ReleaseReservationRequest(user_id=user_id, reservation_id=reservation_id)


def rotate_key_request(
    user_id: str,
    *,
    request_id: str | None = None,
    grace_period: datetime.timedelta | None = None,
    delete_old: bool = False,
) -> keybroker_pb2.RotateKeyRequest:
    return keybroker_pb2.RotateKeyRequest(
        user_id=user_id,
        request_id=request_id or new_request_id(),
        grace_period=duration(grace_period) if grace_period is not None else None,
        delete_old=delete_old,
    )


def provision_key_request(
    user_id: str,
    *,
    tier: str = "",
    monthly_limit_usd: Money | None = None,
    request_id: str | None = None,
) -> keybroker_pb2.ProvisionKeyRequest:
    return keybroker_pb2.ProvisionKeyRequest(
        user_id=user_id,
        tier=tier,
        monthly_limit_usd=usd(monthly_limit_usd) if monthly_limit_usd is not None else "",
        request_id=request_id or new_request_id(),
    )


def update_key_request(
    user_id: str,
    *,
    tier: str | None = None,
    monthly_limit_usd: Money | None = None,
    disabled: bool | None = None,
) -> keybroker_pb2.UpdateKeyRequest:
    request = keybroker_pb2.UpdateKeyRequest(user_id=user_id)
    if tier is not None:
        request.tier = tier
    if monthly_limit_usd is not None:
        request.monthly_limit_usd = usd(monthly_limit_usd)
    if disabled is not None:
        request.disabled = disabled
    return request


def revoke_key_request(user_id: str, *, delete: bool = False) -> keybroker_pb2.RevokeKeyRequest:
    return keybroker_pb2.RevokeKeyRequest(user_id=user_id, delete=delete)


def list_keys_request(*, page_size: int = 0, page_token: str = "") -> keybroker_pb2.ListKeysRequest:
    return keybroker_pb2.ListKeysRequest(page_size=page_size, page_token=page_token)


def get_usage_summary_request(
    user_id: str, *, month: str | datetime.date | None = None
) -> keybroker_pb2.GetUsageSummaryRequest:
    if isinstance(month, datetime.date):
        month = f"{month.year:04d}-{month.month:02d}"
    return keybroker_pb2.GetUsageSummaryRequest(user_id=user_id, month=month or "")


def get_key_info_request(user_id: str) -> keybroker_pb2.GetKeyInfoRequest:
    return keybroker_pb2.GetKeyInfoRequest(user_id=user_id)


COST_REPORT_KINDS = {
    "daily": keybroker_pb2.COST_REPORT_KIND_DAILY,
    "monthly": keybroker_pb2.COST_REPORT_KIND_MONTHLY,
}


def cost_report_request(
    kind: str | int,
    *,
    date: str | datetime.date | None = None,
    month: str | datetime.date | None = None,
    page_size: int = 0,
    page_token: str = "",
) -> keybroker_pb2.GetCostReportRequest:
    """``kind``: "daily", "monthly" (any case) or a ``CostReportKind`` value; ``date`` a day
    ("YYYY-MM-DD" or a ``date``), ``month`` "YYYY-MM" or any ``date`` in the month."""
    if isinstance(kind, str):
        try:
            kind = COST_REPORT_KINDS[kind.lower()]
        except KeyError:
            raise ValueError(f"kind must be 'daily' or 'monthly', not {kind!r}") from None
    if isinstance(date, datetime.datetime):
        date = date.date()
    if isinstance(date, datetime.date):
        date = date.isoformat()
    if isinstance(month, datetime.date):
        month = f"{month.year:04d}-{month.month:02d}"
    return keybroker_pb2.GetCostReportRequest(
        kind=keybroker_pb2.CostReportKind.ValueType(kind),
        date=date or "",
        month=month or "",
        page_size=page_size,
        page_token=page_token,
    )


def report_key_invalid_request(
    user_id: str, key_id: str, http_status: int
) -> keybroker_pb2.ReportKeyInvalidRequest:
    return keybroker_pb2.ReportKeyInvalidRequest(user_id=user_id, key_id=key_id, http_status=http_status)


def reconcile_request(*, dry_run: bool = False) -> keybroker_pb2.ReconcileRequest:
    return keybroker_pb2.ReconcileRequest(dry_run=dry_run)


def rotate_keys_request(
    *,
    older_than: datetime.timedelta,
    grace_period: datetime.timedelta,
    delete_old: bool = False,
    dry_run: bool = False,
) -> keybroker_pb2.RotateKeysRequest:
    return keybroker_pb2.RotateKeysRequest(
        older_than=duration(older_than),
        grace_period=duration(grace_period),
        delete_old=delete_old,
        dry_run=dry_run,
    )
