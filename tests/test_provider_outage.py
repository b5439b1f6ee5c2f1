"""OpenRouter down (issue 5, item 3): every management call fails (HTTP 500, HTTP 429 with Retry-After,
connection refused, or no answer at all).

Provider-facing RPCs (ProvisionKey, RotateKey, UpdateKey with a limit change) answer UNAVAILABLE
PROVIDER_UNAVAILABLE with RetryInfo well within their deadline and leave no provider key behind; the
hot path (GetKey, CheckLimit, RecordUsage, ReleaseReservation) never waits for OpenRouter; once it is
back, the provider-facing RPCs succeed, and no user ends up with two live provider keys.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from keybroker.v1 import keybroker_pb2 as pb

from broker.sandbox import Fault, Sandbox
from tests.conftest import Broker
from tests.helpers import assert_rpc_error, detail_of

DEADLINE = 10.0  # seconds: what an operator's client would allow a provider-facing call
HOT_DEADLINE = 5.0  # a hot-path call that waited for OpenRouter (10 s timeout) would miss this
RECOVERED_DEADLINE = 15.0


@dataclass
class Outage:
    """One way for OpenRouter to be down, switched on and off around a live sandbox."""

    kind: str
    sandbox: Sandbox
    port: int = 0
    down: bool = False

    async def begin(self) -> None:
        assert self.sandbox.base_url
        self.port = int(self.sandbox.base_url.rsplit(":", 1)[1].split("/")[0])
        if self.kind == "http-500":
            self.sandbox.faults.add(Fault(path_prefix="/api/v1", status=500, times=10**6))
        elif self.kind == "http-429":
            self.sandbox.faults.add(Fault(path_prefix="/api/v1", status=429, retry_after="1", times=10**6))
        elif self.kind == "hung":  # accepts the connection, never answers in time
            self.sandbox.faults.add(Fault(path_prefix="/api/v1", delay_seconds=60, times=10**6))
        else:
            assert self.kind == "unreachable"
            await self.sandbox.stop()
        self.down = True

    async def end(self) -> None:
        if not self.down:
            return
        if self.kind == "unreachable":
            await self.sandbox.start("127.0.0.1", self.port)  # the same address: the broker keeps its URL
        elif self.kind == "hung":
            self.sandbox.faults.clear()
            await self.sandbox.stop()  # cut the requests still held
            await self.sandbox.start("127.0.0.1", self.port)
        else:
            self.sandbox.faults.clear()
        self.down = False


@pytest.fixture
async def outage(request: pytest.FixtureRequest, sandbox: Sandbox) -> AsyncIterator[Outage]:
    down = Outage(request.param, sandbox)
    try:
        yield down
    finally:
        await down.end()


FAILING = ["http-500", "http-429", "unreachable"]


def live_keys(sandbox: Sandbox) -> Counter[str]:
    """Provider key names of live (not deleted) keys, with how many keys carry each."""
    return Counter(key.name for key in sandbox.state.all_keys() if not key.deleted)


def enabled_keys(sandbox: Sandbox, user: str) -> list[str]:
    return [
        key.name
        for key in sandbox.state.all_keys()
        if key.name.startswith(f"keybroker:{user}:") and not key.deleted and not key.disabled
    ]


async def unavailable_in_time(call: Callable[[], Awaitable[Any]]) -> float:
    """Run `call` (which must fail): UNAVAILABLE PROVIDER_UNAVAILABLE with RetryInfo before the
    deadline. Returns the RetryInfo delay in seconds."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await call()
    elapsed = loop.time() - started
    assert failed.value.code() != grpc.StatusCode.DEADLINE_EXCEEDED, "answered within the deadline"
    assert_rpc_error(failed.value, grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE")
    retry = detail_of(failed.value, error_details_pb2.RetryInfo)
    assert retry is not None, "UNAVAILABLE carries RetryInfo"
    delay: float = retry.retry_delay.ToTimedelta().total_seconds()  # type: ignore[attr-defined]
    assert delay > 0
    assert elapsed < DEADLINE
    return delay


def provider_facing(broker: Broker, suffix: str = "") -> dict[str, Callable[[], Awaitable[Any]]]:
    """The RPCs that must talk to OpenRouter, each as a fresh call with a fixed request_id."""
    return {
        "ProvisionKey": lambda: broker.admin.ProvisionKey(
            pb.ProvisionKeyRequest(user_id="newcomer", request_id=f"prov-1{suffix}"),
            metadata=broker.as_admin(),
            timeout=DEADLINE,
        ),
        "RotateKey": lambda: broker.agent.RotateKey(
            pb.RotateKeyRequest(user_id="steady", request_id=f"rot-1{suffix}"),
            metadata=broker.as_agent(),
            timeout=DEADLINE,
        ),
        "UpdateKey": lambda: broker.admin.UpdateKey(
            pb.UpdateKeyRequest(user_id="steady", monthly_limit_usd="20"),
            metadata=broker.as_admin(),
            timeout=DEADLINE,
        ),
    }


async def key_info(broker: Broker, user: str) -> pb.KeyInfo:
    reply = await broker.admin.GetKeyInfo(
        pb.GetKeyInfoRequest(user_id=user), metadata=broker.as_admin(), timeout=HOT_DEADLINE
    )
    info: pb.KeyInfo = reply.key
    return info


@pytest.mark.parametrize("outage", FAILING, indirect=True)
async def test_provider_facing_rpcs_answer_unavailable_in_time_and_leave_no_key_behind(
    broker: Broker, sandbox: Sandbox, outage: Outage
) -> None:
    await broker.provision("steady", limit="10")
    before = live_keys(sandbox)
    await outage.begin()
    for name, call in provider_facing(broker).items():
        delay = await unavailable_in_time(call)
        if outage.kind == "http-429":
            assert delay == pytest.approx(1.0), f"{name}: Retry-After becomes RetryInfo"
    await unavailable_in_time(provider_facing(broker)["UpdateKey"])  # a retry fails the same way
    assert live_keys(sandbox) == before, "no provider key was made"
    steady = await key_info(broker, "steady")
    assert (steady.key_version, steady.limit_usd) == (1, "10"), "nothing changed"
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await key_info(broker, "newcomer")
    assert_rpc_error(missing.value, grpc.StatusCode.NOT_FOUND, "NO_API_KEY")


@pytest.mark.parametrize("outage", [*FAILING, "hung"], indirect=True)
async def test_the_hot_path_keeps_working_while_the_provider_is_down(
    broker: Broker, sandbox: Sandbox, outage: Outage
) -> None:
    await broker.provision("hot", limit="5")
    agent, auth = broker.agent, broker.as_agent()
    first = await agent.GetKey(pb.GetKeyRequest(user_id="hot"), metadata=auth)
    await outage.begin()
    stuck: asyncio.Future[Any] | None = None
    if outage.kind == "hung":  # a provider-facing call is held at OpenRouter meanwhile
        stuck = asyncio.ensure_future(
            broker.agent.RotateKey(pb.RotateKeyRequest(user_id="hot", request_id="rot-held"), metadata=auth)
        )
        await asyncio.wait_for(sandbox.faults.wait_fired(), 30)

    key = await agent.GetKey(pb.GetKeyRequest(user_id="hot"), metadata=auth, timeout=HOT_DEADLINE)
    assert (key.api_key, key.key_version) == (first.api_key, 1)
    pure = await agent.CheckLimit(pb.CheckLimitRequest(user_id="hot"), metadata=auth, timeout=HOT_DEADLINE)
    assert pure.allowed and pure.remaining_usd == "5"
    held = await agent.CheckLimit(
        pb.CheckLimitRequest(user_id="hot", estimated_cost_usd="0.5", request_id="chk-1"),
        metadata=auth,
        timeout=HOT_DEADLINE,
    )
    assert held.allowed and held.reservation_id
    spare = await agent.CheckLimit(
        pb.CheckLimitRequest(user_id="hot", estimated_cost_usd="0.3"), metadata=auth, timeout=HOT_DEADLINE
    )
    assert spare.allowed and Decimal(spare.reserved_usd) == Decimal("0.8")
    recorded = await agent.RecordUsage(
        pb.RecordUsageRequest(
            user_id="hot", request_id="gen-1", reservation_id=held.reservation_id, cost_usd="0.2", model="m"
        ),
        metadata=auth,
        timeout=HOT_DEADLINE,
    )
    assert not recorded.duplicate and recorded.spent_usd == "0.2"
    released = await agent.ReleaseReservation(
        pb.ReleaseReservationRequest(user_id="hot", reservation_id=spare.reservation_id),
        metadata=auth,
        timeout=HOT_DEADLINE,
    )
    assert released.released and released.reserved_usd == "0"
    # Concurrent hot-path traffic during the outage: all of it answered, all of it counted.
    replies = await asyncio.gather(
        *(
            agent.RecordUsage(
                pb.RecordUsageRequest(user_id="hot", request_id=f"gen-burst-{i}", cost_usd="0.01"),
                metadata=auth,
                timeout=HOT_DEADLINE * 4,
            )
            for i in range(100)
        )
    )
    assert max(Decimal(reply.spent_usd) for reply in replies) == Decimal("1.2")
    info = await key_info(broker, "hot")
    assert Decimal(info.spent_usd) == Decimal("1.2") and info.key_version == 1

    if stuck is not None:
        await outage.end()  # the held call is cut off: it fails, it does not hang
        with pytest.raises(grpc.aio.AioRpcError) as cut:
            await asyncio.wait_for(stuck, DEADLINE * 6)
        assert_rpc_error(cut.value, grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE")


@pytest.mark.parametrize("outage", FAILING, indirect=True)
async def test_after_recovery_the_provider_facing_rpcs_succeed_for_users_the_outage_did_not_touch(
    broker: Broker, sandbox: Sandbox, outage: Outage
) -> None:
    await broker.provision("steady", limit="10")
    await outage.begin()
    await unavailable_in_time(provider_facing(broker)["UpdateKey"])
    await outage.end()

    made = await broker.admin.ProvisionKey(
        pb.ProvisionKeyRequest(user_id="later", request_id="prov-later"),
        metadata=broker.as_admin(),
        timeout=RECOVERED_DEADLINE,
    )
    assert made.key.key_version == 1
    updated = await broker.admin.UpdateKey(
        pb.UpdateKeyRequest(user_id="steady", monthly_limit_usd="20"),
        metadata=broker.as_admin(),
        timeout=RECOVERED_DEADLINE,
    )
    assert updated.key.limit_usd == "20"
    [provider_key] = [k for k in sandbox.state.all_keys() if k.hash == updated.key.key_id]
    assert provider_key.limit == Decimal(20), "the provider key's limit is in step again"
    rotated = await broker.agent.RotateKey(
        pb.RotateKeyRequest(user_id="steady", request_id="rot-later"),
        metadata=broker.as_agent(),
        timeout=RECOVERED_DEADLINE,
    )
    assert rotated.key_version == 2
    assert enabled_keys(sandbox, "steady") == ["keybroker:steady:v2"], "the old key is disabled at once"
    assert enabled_keys(sandbox, "later") == ["keybroker:later:v1"]
    assert all(count == 1 for count in live_keys(sandbox).values()), live_keys(sandbox)


@pytest.mark.parametrize("outage", ["http-500"], indirect=True)  # the same for every kind of outage
async def test_a_retry_of_a_failed_call_is_answered_promptly_during_and_after_the_outage(
    broker: Broker, sandbox: Sandbox, outage: Outage
) -> None:
    await broker.provision("steady", limit="10")
    await outage.begin()
    calls = provider_facing(broker)
    for call in calls.values():
        await unavailable_in_time(call)
    for call in calls.values():  # the client retries (same request_id) while OpenRouter is still down
        await unavailable_in_time(call)
    await outage.end()

    loop = asyncio.get_running_loop()
    started = loop.time()
    provisioned = await broker.admin.ProvisionKey(
        pb.ProvisionKeyRequest(user_id="newcomer", request_id="prov-1"),
        metadata=broker.as_admin(),
        timeout=RECOVERED_DEADLINE,
    )
    rotated = await broker.agent.RotateKey(
        pb.RotateKeyRequest(user_id="steady", request_id="rot-1"),
        metadata=broker.as_agent(),
        timeout=RECOVERED_DEADLINE,
    )
    assert loop.time() - started < RECOVERED_DEADLINE
    assert provisioned.key.key_version == 1 and rotated.key_version == 2
    assert enabled_keys(sandbox, "newcomer") == ["keybroker:newcomer:v1"]
    assert enabled_keys(sandbox, "steady") == ["keybroker:steady:v2"]
    assert all(count == 1 for count in live_keys(sandbox).values()), live_keys(sandbox)
