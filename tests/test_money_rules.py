"""The money rules through the real server: exact sums under concurrency, idempotency,
atomic reservations, expiry, month boundaries, and the monthly limit on GetKey."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import grpc
import pytest
from google.rpc import error_details_pb2
from keybroker.v1 import keybroker_pb2 as pb

from tests.conftest import Broker, TestClock
from tests.helpers import assert_rpc_error, detail_of


def usage(user: str, request_id: str, cost: str, **extra: object) -> pb.RecordUsageRequest:
    return pb.RecordUsageRequest(
        user_id=user,
        request_id=request_id,
        cost_usd=cost,
        model=str(extra.pop("model", "openai/gpt-4o")),
        agent=str(extra.pop("agent", "planner")),
        prompt_tokens=10,
        completion_tokens=5,
        **extra,
    )


async def test_200_concurrent_usage_records_sum_exactly_and_retries_count_nothing(broker: Broker) -> None:
    await broker.provision("alice", tier="beta")
    costs = [Decimal("0.000123") * (i % 7 + 1) + Decimal("0.0000000001") * i for i in range(200)]
    replies = await asyncio.gather(
        *(
            broker.agent.RecordUsage(
                usage("alice", f"gen-{i}", str(c)), metadata=broker.as_agent(), timeout=30
            )
            for i, c in enumerate(costs)
        )
    )
    assert not any(r.duplicate for r in replies)
    expected = sum(costs, Decimal(0))
    assert max(Decimal(r.spent_usd) for r in replies) == expected
    firsts = {f"gen-{i}": r for i, r in enumerate(replies)}

    retries = await asyncio.gather(
        *(
            broker.agent.RecordUsage(
                usage("alice", f"gen-{i}", str(costs[i])), metadata=broker.as_agent(), timeout=30
            )
            for i in range(50)
        )
    )
    assert all(r.duplicate for r in retries)
    for i, retry in enumerate(retries):
        assert retry.spent_usd == firsts[f"gen-{i}"].spent_usd, "a retry returns the first answer"
    summary = await broker.admin.GetUsageSummary(
        pb.GetUsageSummaryRequest(user_id="alice"), metadata=broker.as_admin()
    )
    assert summary.total_requests == 200
    assert Decimal(summary.total_cost_usd) == expected
    key = await broker.agent.GetKey(pb.GetKeyRequest(user_id="alice"), metadata=broker.as_agent())
    assert Decimal(key.spent_usd) == expected


async def test_100_concurrent_reservations_of_a_tenth_against_one_dollar_allow_exactly_ten(
    broker: Broker,
) -> None:
    await broker.provision("bob", limit="1.00")
    replies = await asyncio.gather(
        *(
            broker.agent.CheckLimit(
                pb.CheckLimitRequest(user_id="bob", estimated_cost_usd="0.1"),
                metadata=broker.as_agent(),
                timeout=30,
            )
            for _ in range(100)
        )
    )
    allowed = [r for r in replies if r.allowed]
    assert len(allowed) == 10
    assert len({r.reservation_id for r in allowed}) == 10 and all(r.reservation_id for r in allowed)
    assert all(not r.reservation_id for r in replies if not r.allowed)
    check = await broker.agent.CheckLimit(pb.CheckLimitRequest(user_id="bob"), metadata=broker.as_agent())
    assert Decimal(check.reserved_usd) == Decimal("1.0") and Decimal(check.remaining_usd) == 0
    assert not check.allowed, "without an estimate: spent + reserved < limit"


async def test_a_settled_reservation_leaves_actual_spend_and_frees_the_rest(broker: Broker) -> None:
    await broker.provision("carol", limit="5")
    check = await broker.agent.CheckLimit(
        pb.CheckLimitRequest(user_id="carol", estimated_cost_usd="0.50", request_id="chk-1"),
        metadata=broker.as_agent(),
    )
    assert check.allowed and Decimal(check.reserved_usd) == Decimal("0.5")
    again = await broker.agent.CheckLimit(
        pb.CheckLimitRequest(user_id="carol", estimated_cost_usd="0.50", request_id="chk-1"),
        metadata=broker.as_agent(),
    )
    assert again.reservation_id == check.reservation_id, "a retried CheckLimit reuses its reservation"
    assert Decimal(again.reserved_usd) == Decimal("0.5")
    reply = await broker.agent.RecordUsage(
        usage("carol", "gen-x", "0.12", reservation_id=check.reservation_id), metadata=broker.as_agent()
    )
    assert Decimal(reply.spent_usd) == Decimal("0.12")
    assert Decimal(reply.remaining_usd) == Decimal("4.88")
    after = await broker.agent.CheckLimit(pb.CheckLimitRequest(user_id="carol"), metadata=broker.as_agent())
    assert Decimal(after.spent_usd) == Decimal("0.12") and Decimal(after.reserved_usd) == 0


async def test_a_released_reservation_stops_counting_at_once(broker: Broker) -> None:
    await broker.provision("rel", limit="1")
    check = await broker.agent.CheckLimit(
        pb.CheckLimitRequest(user_id="rel", estimated_cost_usd="0.7"), metadata=broker.as_agent()
    )
    released = await broker.agent.ReleaseReservation(
        pb.ReleaseReservationRequest(user_id="rel", reservation_id=check.reservation_id),
        metadata=broker.as_agent(),
    )
    assert released.released and Decimal(released.reserved_usd) == 0
    twice = await broker.agent.ReleaseReservation(
        pb.ReleaseReservationRequest(user_id="rel", reservation_id=check.reservation_id),
        metadata=broker.as_agent(),
    )
    assert not twice.released


async def test_an_expired_reservation_stops_counting(broker: Broker, clock: TestClock) -> None:
    await broker.provision("dave", limit="1")
    first = await broker.agent.CheckLimit(
        pb.CheckLimitRequest(user_id="dave", estimated_cost_usd="0.9"), metadata=broker.as_agent()
    )
    assert first.allowed
    blocked = await broker.agent.CheckLimit(
        pb.CheckLimitRequest(user_id="dave", estimated_cost_usd="0.2"), metadata=broker.as_agent()
    )
    assert not blocked.allowed
    clock.offset = broker.runtime.settings.reservation_ttl + timedelta(seconds=1)
    pure = await broker.agent.CheckLimit(pb.CheckLimitRequest(user_id="dave"), metadata=broker.as_agent())
    assert Decimal(pure.reserved_usd) == 0 and pure.allowed
    later = await broker.agent.CheckLimit(
        pb.CheckLimitRequest(user_id="dave", estimated_cost_usd="0.2"), metadata=broker.as_agent()
    )
    assert later.allowed and Decimal(later.reserved_usd) == Decimal("0.2")
    # Settling the expired reservation afterwards records the usage and frees nothing twice.
    reply = await broker.agent.RecordUsage(
        usage("dave", "gen-late", "0.3", reservation_id=first.reservation_id), metadata=broker.as_agent()
    )
    assert Decimal(reply.spent_usd) == Decimal("0.3") and Decimal(reply.remaining_usd) == Decimal("0.5")


async def test_usage_in_a_new_month_starts_from_zero(broker: Broker, clock: TestClock) -> None:
    clock.fixed = datetime(2026, 1, 31, 23, 59, 59, tzinfo=UTC)
    await broker.provision("erin", limit="2")
    await broker.agent.RecordUsage(usage("erin", "jan-1", "2"), metadata=broker.as_agent())
    with pytest.raises(grpc.aio.AioRpcError) as blocked:
        await broker.agent.GetKey(pb.GetKeyRequest(user_id="erin"), metadata=broker.as_agent())
    assert_rpc_error(blocked.value, grpc.StatusCode.RESOURCE_EXHAUSTED, "MONTHLY_LIMIT_EXCEEDED")
    clock.fixed = datetime(2026, 2, 1, 0, 0, 0, tzinfo=UTC)
    key = await broker.agent.GetKey(pb.GetKeyRequest(user_id="erin"), metadata=broker.as_agent())
    assert key.spent_usd == "0" and key.remaining_usd == "2"
    check = await broker.agent.CheckLimit(pb.CheckLimitRequest(user_id="erin"), metadata=broker.as_agent())
    assert check.period_end_time.ToDatetime(tzinfo=UTC) == datetime(2026, 3, 1, tzinfo=UTC)
    jan = await broker.admin.GetUsageSummary(
        pb.GetUsageSummaryRequest(user_id="erin", month="2026-01"), metadata=broker.as_admin()
    )
    assert jan.total_requests == 1 and jan.total_cost_usd == "2"


async def test_a_reservation_settled_in_the_next_month_is_taken_off_its_own_month(
    broker: Broker, clock: TestClock
) -> None:
    # The new month's period has nothing reserved, so RecordUsage there skips the expiry sweep
    # (sql/0007): the reservation must still leave January, and February count only the cost.
    clock.fixed = datetime(2026, 1, 31, 23, 58, 0, tzinfo=UTC)
    await broker.provision("fern", limit="5")
    held = await broker.agent.CheckLimit(
        pb.CheckLimitRequest(user_id="fern", estimated_cost_usd="1.5"), metadata=broker.as_agent()
    )
    assert held.allowed and Decimal(held.reserved_usd) == Decimal("1.5")
    clock.fixed = datetime(2026, 2, 1, 0, 1, 0, tzinfo=UTC)
    reply = await broker.agent.RecordUsage(
        usage("fern", "gen-across", "0.7", reservation_id=held.reservation_id), metadata=broker.as_agent()
    )
    assert Decimal(reply.spent_usd) == Decimal("0.7") and Decimal(reply.remaining_usd) == Decimal("4.3")
    conn = await broker.db()
    try:
        periods = await conn.fetch(
            "SELECT period_start, spent_usd, reserved_usd FROM usage_periods WHERE user_id = 'fern' "
            "ORDER BY period_start"
        )
        open_reservations = await conn.fetchval("SELECT count(*) FROM reservations WHERE user_id = 'fern'")
    finally:
        await conn.close()
    assert [(str(p["period_start"]), p["spent_usd"], p["reserved_usd"]) for p in periods] == [
        ("2026-01-01", Decimal(0), Decimal(0)),
        ("2026-02-01", Decimal("0.7"), Decimal(0)),
    ]
    assert open_reservations == 0


async def test_get_key_is_refused_once_spent_reaches_the_limit_with_the_amounts(broker: Broker) -> None:
    await broker.provision("frank", limit="1.5")
    reply = await broker.agent.RecordUsage(usage("frank", "g1", "1.6"), metadata=broker.as_agent())
    assert reply.over_limit and Decimal(reply.remaining_usd) == Decimal("-0.1"), (
        "recorded even past the limit"
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await broker.agent.GetKey(pb.GetKeyRequest(user_id="frank"), metadata=broker.as_agent())
    info = assert_rpc_error(refused.value, grpc.StatusCode.RESOURCE_EXHAUSTED, "MONTHLY_LIMIT_EXCEEDED")
    assert info.metadata["limit_usd"] == "1.5" and info.metadata["usage_usd"] == "1.6"
    quota = detail_of(refused.value, error_details_pb2.QuotaFailure)
    assert quota is not None and quota.violations[0].subject == "user:frank"


async def test_unlimited_tiers_are_never_blocked(broker: Broker) -> None:
    await broker.provision("root", tier="admin")
    await broker.agent.RecordUsage(usage("root", "big", "1000000"), metadata=broker.as_agent())
    key = await broker.agent.GetKey(pb.GetKeyRequest(user_id="root"), metadata=broker.as_agent())
    assert key.unlimited and key.limit_usd == "" and key.remaining_usd == ""
    check = await broker.agent.CheckLimit(
        pb.CheckLimitRequest(user_id="root", estimated_cost_usd="99999"), metadata=broker.as_agent()
    )
    assert check.allowed and check.unlimited


async def test_custom_limit_overrides_the_tier(broker: Broker) -> None:
    info = await broker.provision("gina", tier="standard", limit="3.25")
    assert info.limit_usd == "3.25" and info.tier == "standard"
    updated = await broker.admin.UpdateKey(
        pb.UpdateKeyRequest(user_id="gina", monthly_limit_usd=""), metadata=broker.as_admin()
    )
    assert updated.key.limit_usd == "50" and updated.key.custom_limit_usd == ""
