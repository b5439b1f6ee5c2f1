"""Per-user request rate limits on GetKey and CheckLimit: a custom requests-per-minute override or
the tier's default, counted in one fixed window per user and minute in the database, so every
replica enforces one limit together. RecordUsage is never rate-limited (the spend happened)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from keybroker.v1 import keybroker_pb2 as pb

from broker.crypto import generate_master_key
from broker.sandbox import Sandbox
from tests.conftest import Broker, TestClock
from tests.helpers import assert_invalid_argument, assert_rpc_error, detail_of, running_broker


@pytest.fixture
def minute(clock: TestClock) -> datetime:
    """Freeze the clock 5 s into a minute, so no real minute boundary splits a test's window."""
    start = datetime.now(UTC).replace(second=5, microsecond=0)
    clock.fixed = start
    return start


@pytest.fixture
async def replicas(
    database_url: str, sandbox: Sandbox, clock: TestClock, tmp_path: Path, minute: datetime
) -> AsyncIterator[tuple[Broker, Broker]]:
    """Two brokers on one database (same master key, one clock), each with its own pool."""
    master_key = generate_master_key()
    async with (
        running_broker(database_url, sandbox, tmp_path, clock, master_key=master_key) as first,
        running_broker(database_url, sandbox, tmp_path, clock, master_key=master_key) as second,
    ):
        yield first, second


async def set_rpm(broker: Broker, user_id: str, rpm: int) -> pb.KeyInfo:
    reply = await broker.admin.UpdateKey(
        pb.UpdateKeyRequest(user_id=user_id, requests_per_minute=rpm), metadata=broker.as_admin(), timeout=10
    )
    return reply.key


async def get_key(broker: Broker, user_id: str) -> Any:
    return await broker.agent.GetKey(
        pb.GetKeyRequest(user_id=user_id), metadata=broker.as_agent(), timeout=10
    )


async def check(broker: Broker, user_id: str) -> Any:
    return await broker.agent.CheckLimit(
        pb.CheckLimitRequest(user_id=user_id), metadata=broker.as_agent(), timeout=10
    )


async def refused(call: Any) -> grpc.aio.AioRpcError:
    """The call's RESOURCE_EXHAUSTED RATE_LIMITED error, after checking its RetryInfo."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert_rpc_error(caught.value, grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
    retry = detail_of(caught.value, error_details_pb2.RetryInfo)
    assert retry is not None, "RATE_LIMITED carries RetryInfo"
    delay = retry.retry_delay.ToTimedelta()  # type: ignore[attr-defined]
    assert timedelta(0) < delay <= timedelta(seconds=60)
    return caught.value


async def allowed_of(calls: list[Any]) -> int:
    """How many of the concurrent calls passed; every other one must be RATE_LIMITED."""
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            assert isinstance(outcome, grpc.aio.AioRpcError), outcome
            assert_rpc_error(outcome, grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
    return sum(not isinstance(outcome, BaseException) for outcome in outcomes)


async def record(broker: Broker, user_id: str, request_id: str) -> pb.RecordUsageResponse:
    return await broker.agent.RecordUsage(
        pb.RecordUsageRequest(user_id=user_id, request_id=request_id, cost_usd="0.001"),
        metadata=broker.as_agent(),
        timeout=10,
    )


async def test_a_custom_limit_is_one_limit_across_two_replicas(
    replicas: tuple[Broker, Broker], clock: TestClock, minute: datetime
) -> None:
    first, second = replicas
    await first.provision("alice")
    info = await set_rpm(first, "alice", 5)
    assert info.requests_per_minute == 5

    for _ in range(3):
        await get_key(first, "alice")
    await check(second, "alice")
    await get_key(second, "alice")  # the 5th call of this minute, on either replica
    error = await refused(get_key(second, "alice"))  # the 6th
    assert "rate limit" in (error.details() or "")
    await refused(check(first, "alice"))  # and the 7th
    retry = detail_of(error, error_details_pb2.RetryInfo)
    assert retry.retry_delay.ToTimedelta() == timedelta(seconds=55)  # type: ignore[attr-defined]

    usage = await asyncio.gather(*(record((first, second)[i % 2], "alice", f"u-{i}") for i in range(10)))
    assert all(not reply.duplicate for reply in usage), "RecordUsage is never rate-limited"

    clock.fixed = minute + timedelta(minutes=1)
    await get_key(second, "alice")  # a new minute, a new window
    # Real concurrency, both replicas: exactly the limit passes.
    calls = [(get_key, check)[i // 2 % 2]((first, second)[i % 2], "alice") for i in range(20)]
    assert await allowed_of(calls) == 4


async def test_zero_removes_the_custom_limit(broker: Broker, minute: datetime) -> None:
    await broker.provision("bob")
    await set_rpm(broker, "bob", 2)
    await get_key(broker, "bob")
    await check(broker, "bob")
    await refused(check(broker, "bob"))

    info = await set_rpm(broker, "bob", 0)
    assert info.requests_per_minute == 0, "free has no default: no limit at all"
    assert await allowed_of([get_key(broker, "bob") for _ in range(20)]) == 20


async def test_the_tier_default_applies_and_a_custom_limit_overrides_it(
    broker: Broker, clock: TestClock, minute: datetime
) -> None:
    conn = await broker.db()
    try:
        await conn.execute("UPDATE tiers SET requests_per_minute = 3 WHERE name = 'standard'")
    finally:
        await conn.close()
    await broker.provision("carol", tier="standard")
    await broker.provision("dave", tier="free")
    info = await broker.admin.GetKeyInfo(pb.GetKeyInfoRequest(user_id="carol"), metadata=broker.as_admin())
    assert info.key.requests_per_minute == 3
    listed = await broker.admin.ListKeys(pb.ListKeysRequest(), metadata=broker.as_admin())
    assert {k.user_id: k.requests_per_minute for k in listed.keys} == {"carol": 3, "dave": 0}

    assert await allowed_of([check(broker, "carol") for _ in range(10)]) == 3
    assert await allowed_of([check(broker, "dave") for _ in range(10)]) == 10, "free: unlimited"

    clock.fixed = minute + timedelta(minutes=1)
    assert (await set_rpm(broker, "carol", 6)).requests_per_minute == 6
    assert await allowed_of([get_key(broker, "carol") for _ in range(10)]) == 6

    clock.fixed = minute + timedelta(minutes=2)
    assert (await set_rpm(broker, "carol", 0)).requests_per_minute == 3, "back to the tier's default"
    assert await allowed_of([get_key(broker, "carol") for _ in range(10)]) == 3


async def test_requests_per_minute_is_validated(broker: Broker) -> None:
    await broker.provision("erin")
    for bad in (-1, 1_000_001):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await set_rpm(broker, "erin", bad)
        assert_invalid_argument(caught.value, "requests_per_minute")


async def test_old_rate_windows_are_pruned(broker: Broker, clock: TestClock, minute: datetime) -> None:
    await broker.provision("frank")
    await set_rpm(broker, "frank", 100)
    for minutes_ago in (30, 11, 9, 0):
        clock.fixed = minute - timedelta(minutes=minutes_ago)
        await check(broker, "frank")
    clock.fixed = minute
    await broker.runtime.alerts.pruner.prune()
    rows = await broker.runtime.db.fetch(
        "SELECT window_start FROM rate_windows WHERE user_id = 'frank' ORDER BY window_start"
    )
    kept = [row["window_start"] for row in rows]
    assert kept == [minute.replace(second=0) - timedelta(minutes=9), minute.replace(second=0)]
