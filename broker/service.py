"""KeyBroker: the hot-path servicer. Validate, call one domain operation, convert back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import grpc
from keybroker.v1 import keybroker_pb2 as pb
from keybroker.v1 import keybroker_pb2_grpc as pb_grpc

from broker import validation as check
from broker.auth import current_caller
from broker.convert import timestamp
from broker.errors import InvalidArgument
from broker.events import KeyEvent, KeyEventHub
from broker.key_reports import KeyReports
from broker.keys import KeyService
from broker.ledger import Ledger, UsageRecord
from broker.money import format_usd


def caller_name() -> str:
    caller = current_caller.get()
    return caller.name if caller is not None else "anonymous"


MAX_WATCHED_USERS = 1000


class KeyBrokerService(pb_grpc.KeyBrokerServicer):
    def __init__(self, keys: KeyService, ledger: Ledger, events: KeyEventHub, reports: KeyReports) -> None:
        self.keys = keys
        self.ledger = ledger
        self.events = events
        self.reports = reports

    async def GetKey(self, request: pb.GetKeyRequest, context: grpc.aio.ServicerContext) -> pb.GetKeyResponse:
        user_id = check.user_id(request.user_id)
        key = await self.keys.get_key(user_id, caller_name())
        remaining = None if key.limit_usd is None else key.limit_usd - key.spent_usd - key.reserved_usd
        return pb.GetKeyResponse(
            api_key=key.api_key,
            key_id=key.key_id,
            key_version=key.key_version,
            limit_usd=format_usd(key.limit_usd),
            spent_usd=format_usd(key.spent_usd),
            remaining_usd=format_usd(remaining),
            unlimited=key.limit_usd is None,
        )

    async def CheckLimit(
        self, request: pb.CheckLimitRequest, context: grpc.aio.ServicerContext
    ) -> pb.CheckLimitResponse:
        user_id = check.user_id(request.user_id)
        estimate = check.usd(request.estimated_cost_usd, "estimated_cost_usd", positive=True)
        request_id = check.request_id(request.request_id, required=False)
        result = await self.ledger.check_limit(user_id, estimate, request_id)
        return pb.CheckLimitResponse(
            allowed=result.allowed,
            limit_usd=format_usd(result.limit_usd),
            spent_usd=format_usd(result.spent_usd),
            reserved_usd=format_usd(result.reserved_usd),
            remaining_usd=format_usd(result.remaining_usd),
            unlimited=result.limit_usd is None,
            period_end_time=timestamp(result.period_end),
            reservation_id=str(result.reservation_id) if result.reservation_id else "",
            reservation_expire_time=timestamp(result.reservation_expire_time),
            key_version=result.key_version,
        )

    async def RecordUsage(
        self, request: pb.RecordUsageRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecordUsageResponse:
        usage = usage_record(request)
        result = await self.ledger.record_usage(usage)
        return pb.RecordUsageResponse(
            duplicate=result.duplicate,
            spent_usd=format_usd(result.spent_usd),
            remaining_usd=format_usd(result.remaining_usd),
            over_limit=result.over_limit,
        )

    async def ReleaseReservation(
        self, request: pb.ReleaseReservationRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReleaseReservationResponse:
        user_id = check.user_id(request.user_id)
        reservation = check.reservation_id(request.reservation_id, required=True)
        assert reservation is not None
        released, reserved = await self.ledger.release_reservation(user_id, reservation)
        return pb.ReleaseReservationResponse(released=released, reserved_usd=format_usd(reserved))

    async def RotateKey(
        self, request: pb.RotateKeyRequest, context: grpc.aio.ServicerContext
    ) -> pb.RotateKeyResponse:
        user_id = check.user_id(request.user_id)
        request_id = check.request_id(request.request_id)
        assert request_id is not None
        grace = check.duration(request.grace_period, "grace_period", check.MAX_GRACE)
        rotation = await self.keys.rotate(user_id, request_id, grace, request.delete_old, caller_name())
        return pb.RotateKeyResponse(
            key_id=rotation.key_id,
            key_version=rotation.key_version,
            previous_key_id=rotation.previous_key_id,
            previous_key_expire_time=timestamp(rotation.previous_key_expire_time),
        )

    async def ReportKeyInvalid(
        self, request: pb.ReportKeyInvalidRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReportKeyInvalidResponse:
        user_id = check.user_id(request.user_id)
        key_id = check.key_id(request.key_id)
        check.http_status(request.http_status)
        result = await self.reports.report_invalid(user_id, key_id, caller_name())
        return pb.ReportKeyInvalidResponse(
            outcome=pb.KeyReportOutcome.Value(f"KEY_REPORT_OUTCOME_{result.outcome}"),
            key_version=result.key_version,
            key_id=result.key_id,
        )

    async def WatchKeys(
        self, request: pb.WatchKeysRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchKeysResponse]:
        users = watched_users(request)
        with self.events.subscribe(users) as subscription:
            # Empty initial metadata tells the caller the subscription is live: every change
            # committed from now on reaches this stream.
            await context.send_initial_metadata(())
            async for event in subscription:
                yield pb.WatchKeysResponse(event=key_event(event))


def watched_users(request: pb.WatchKeysRequest) -> frozenset[str] | None:
    """The WatchKeys filter: None for every user."""
    if len(request.user_ids) > MAX_WATCHED_USERS:
        raise InvalidArgument("user_ids", f"must list at most {MAX_WATCHED_USERS} user ids")
    users = frozenset(check.user_id(value, field="user_ids") for value in request.user_ids)
    return users or None


def key_event(event: KeyEvent) -> pb.KeyEvent:
    return pb.KeyEvent(
        type=pb.KeyEventType.Value(f"KEY_EVENT_TYPE_{event.kind}"),
        user_id=event.user_id,
        key_id=event.key_id,
        key_version=event.key_version,
        event_time=timestamp(event.event_time),
        event_id=event.event_id,
    )


def usage_record(request: pb.RecordUsageRequest) -> UsageRecord:
    """Validate a RecordUsage request field by field (the first bad field is reported)."""
    user_id = check.user_id(request.user_id)
    request_id = check.request_id(request.request_id)
    assert request_id is not None
    cost = check.usd(request.cost_usd, "cost_usd", required=True)
    assert cost is not None
    prompt = check.tokens(request.prompt_tokens, "prompt_tokens")
    completion = check.tokens(request.completion_tokens, "completion_tokens")
    total = check.tokens(request.total_tokens, "total_tokens") or prompt + completion
    call_time = check.duration(request.duration, "duration", check.MAX_CALL_DURATION)
    return UsageRecord(
        user_id=user_id,
        request_id=request_id,
        reservation_id=check.reservation_id(request.reservation_id),
        model=check.text(request.model, "model"),
        agent=check.text(request.agent, "agent"),
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=total,
        cost_usd=cost,
        duration_ms=call_time // timedelta(milliseconds=1),
    )
