"""Conversions between protobuf messages and domain values (money, time, key info)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from google.protobuf import duration_pb2, timestamp_pb2
from keybroker.v1 import keybroker_pb2 as pb

from broker.money import format_usd
from broker.storage.keys_store import UserKey

STATUS = {
    "active": pb.KEY_STATUS_ACTIVE,
    "disabled": pb.KEY_STATUS_DISABLED,
    "revoked": pb.KEY_STATUS_REVOKED,
}


def timestamp(moment: datetime | None) -> timestamp_pb2.Timestamp | None:
    if moment is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment.astimezone(UTC))
    return stamp


def duration(message: duration_pb2.Duration) -> timedelta:
    return timedelta(seconds=message.seconds, microseconds=message.nanos // 1000)


def key_status(user: UserKey) -> int:
    if user.status == "revoked":
        return STATUS["revoked"]
    return STATUS["disabled"] if user.disabled else STATUS["active"]


def key_info(user: UserKey) -> pb.KeyInfo:
    return pb.KeyInfo(
        user_id=user.user_id,
        key_id=user.key_id,
        key_version=user.key_version,
        tier=user.tier,
        limit_usd=format_usd(user.limit_usd),
        unlimited=user.limit_usd is None,
        spent_usd=format_usd(user.spent_usd),
        status=key_status(user),  # type: ignore[arg-type]
        create_time=timestamp(user.create_time),
        rotate_time=timestamp(user.rotate_time),
        custom_limit_usd=format_usd(user.custom_limit_usd),
        requests_per_minute=user.requests_per_minute or 0,
    )
