"""Two broker processes on one database (issue 5, item 4; peers.md rows 1-3): the in-process broker
of the `broker` fixture and a `python -m broker serve` subprocess, called at the same time.

They enforce one limit together (exactly K reservations fit, whichever replica takes them), their
usage sums exactly, a request_id sent to both at once counts once, and a token created through one
works on the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import grpc
import pytest
from keybroker.v1 import keybroker_pb2 as pb
from keybroker.v1 import keybroker_pb2_grpc as pb_grpc

from broker.sandbox import Sandbox
from tests.conftest import Broker
from tests.helpers import assert_rpc_error, eventually

CALL_TIMEOUT = 120  # seconds; generous, the machine is shared


@dataclass
class Replica:
    """A broker subprocess on the fixture broker's database."""

    process: asyncio.subprocess.Process
    target: str
    channel: grpc.aio.Channel
    env: dict[str, str] = field(repr=False)
    logs: list[str] = field(default_factory=list)

    @property
    def agent(self) -> pb_grpc.KeyBrokerStub:
        return pb_grpc.KeyBrokerStub(self.channel)

    @property
    def admin(self) -> pb_grpc.KeyBrokerAdminStub:
        return pb_grpc.KeyBrokerAdminStub(self.channel)


def replica_env(broker: Broker, sandbox: Sandbox, data_dir: Path) -> dict[str, str]:
    settings = broker.runtime.settings
    assert settings.database_url and settings.master_key and sandbox.base_url
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYBROKER_", "OPENROUTER_"))}
    env.update(
        KEYBROKER_DATABASE_URL=settings.database_url,
        KEYBROKER_MASTER_KEY=settings.master_key,
        OPENROUTER_MANAGEMENT_KEY=sandbox.management_key,
        OPENROUTER_BASE_URL=str(sandbox.base_url),
        KEYBROKER_LISTEN="127.0.0.1:0",
        KEYBROKER_DATA_DIR=str(data_dir),
        KEYBROKER_LOG_FORMAT="json",
    )
    return env


async def port_from_log(stream: asyncio.StreamReader, seen: list[str], timeout: float = 120) -> int:
    async def scan() -> int:
        while True:
            line = (await stream.readline()).decode()
            if not line:
                raise AssertionError("the replica ended before listening:\n" + "".join(seen))
            seen.append(line)
            match = re.search(r"listening on port (\d+)", line)
            if match:
                return int(match.group(1))

    return await asyncio.wait_for(scan(), timeout)


@pytest.fixture
async def replica(broker: Broker, sandbox: Sandbox, tmp_path: Path) -> AsyncIterator[Replica]:
    env = replica_env(broker, sandbox, tmp_path / "replica")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker", "serve", env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    assert process.stderr is not None
    logs: list[str] = []
    drain: asyncio.Task[None] | None = None
    try:
        port = await port_from_log(process.stderr, logs)

        async def keep_reading(stream: asyncio.StreamReader) -> None:
            while line := await stream.readline():  # a full pipe would stall the replica
                logs.append(line.decode())

        drain = asyncio.create_task(keep_reading(process.stderr))
        target = f"127.0.0.1:{port}"
        async with grpc.aio.insecure_channel(target) as channel:
            await asyncio.wait_for(channel.channel_ready(), 60)
            yield Replica(process, target, channel, env, logs)
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 60) == 0, "the replica drains and exits cleanly"
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        if drain is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(drain, 10)
    bugs = [line[-600:] for line in logs if "bug while serving" in line or "Traceback" in line]
    assert not bugs, f"the replica logged {len(bugs)} bugs, the first ends:\n{bugs[0]}"


def usage(user: str, request_id: str, cost: Decimal | str) -> pb.RecordUsageRequest:
    return pb.RecordUsageRequest(
        user_id=user,
        request_id=request_id,
        cost_usd=str(cost),
        model="openai/gpt-4o",
        agent="planner",
        prompt_tokens=10,
        completion_tokens=5,
    )


async def spent_and_reserved(
    stub: pb_grpc.KeyBrokerStub, user: str, metadata: object
) -> tuple[Decimal, Decimal]:
    check = await stub.CheckLimit(pb.CheckLimitRequest(user_id=user), metadata=metadata, timeout=CALL_TIMEOUT)
    return Decimal(check.spent_usd), Decimal(check.reserved_usd)


async def test_500_concurrent_reservations_on_two_replicas_take_exactly_the_remaining_budget(
    broker: Broker, replica: Replica
) -> None:
    await broker.provision("shared", limit="5")
    await broker.agent.RecordUsage(usage("shared", "before", "1.23"), metadata=broker.as_agent())
    # 3.77 left: exactly 377 reservations of 0.01 fit, more than either replica's 250 calls, so
    # both must grant some and together refuse exactly 123.
    stubs = (broker.agent, replica.agent)
    replies = await asyncio.gather(
        *(
            stubs[i % 2].CheckLimit(
                pb.CheckLimitRequest(user_id="shared", estimated_cost_usd="0.01"),
                metadata=broker.as_agent(),
                timeout=CALL_TIMEOUT,
            )
            for i in range(500)
        )
    )
    granted = [reply for reply in replies if reply.allowed]
    assert len(granted) == 377
    assert len({reply.reservation_id for reply in granted}) == 377 and all(r.reservation_id for r in granted)
    assert all(not reply.reservation_id for reply in replies if not reply.allowed)
    per_replica = [sum(1 for i, r in enumerate(replies) if r.allowed and i % 2 == side) for side in (0, 1)]
    assert min(per_replica) > 0, per_replica
    assert all(Decimal(reply.reserved_usd) <= Decimal("3.77") for reply in replies), "never over the budget"
    for stub in stubs:
        spent, reserved = await spent_and_reserved(stub, "shared", broker.as_agent())
        assert (spent, reserved) == (Decimal("1.23"), Decimal("3.77"))
    conn = await broker.db()
    try:
        count, total = await conn.fetchrow(
            "SELECT count(*), sum(amount_usd) FROM reservations WHERE user_id = 'shared'"
        )
    finally:
        await conn.close()
    assert (count, total) == (377, Decimal("3.77"))


async def test_1000_usage_records_on_two_replicas_sum_exactly(broker: Broker, replica: Replica) -> None:
    await broker.provision("busy", tier="beta")
    costs = [Decimal("0.000123") * (i % 11 + 1) + Decimal("0.0000000001") * i for i in range(1000)]
    stubs = (broker.agent, replica.agent)
    replies = await asyncio.gather(
        *(
            stubs[i % 2].RecordUsage(
                usage("busy", f"gen-{i}", cost), metadata=broker.as_agent(), timeout=CALL_TIMEOUT
            )
            for i, cost in enumerate(costs)
        )
    )
    total = sum(costs, Decimal(0))
    assert not any(reply.duplicate for reply in replies)
    running = sorted(Decimal(reply.spent_usd) for reply in replies)
    assert len(set(running)) == 1000, "each record saw its own running total: none was lost or doubled"
    assert running[-1] == total
    for stub in stubs:
        spent, _ = await spent_and_reserved(stub, "busy", broker.as_agent())
        assert spent == total
    for admin in (broker.admin, replica.admin):
        summary = await admin.GetUsageSummary(
            pb.GetUsageSummaryRequest(user_id="busy"), metadata=broker.as_admin(), timeout=CALL_TIMEOUT
        )
        assert summary.total_requests == 1000 and Decimal(summary.total_cost_usd) == total


async def test_the_same_request_id_sent_to_both_replicas_at_once_counts_once(
    broker: Broker, replica: Replica
) -> None:
    await broker.provision("twice", tier="beta")
    costs = [Decimal("0.01") + Decimal("0.0001") * i for i in range(50)]
    calls = []
    for i, cost in enumerate(costs):
        request = usage("twice", f"gen-{i}", cost)
        calls.append(broker.agent.RecordUsage(request, metadata=broker.as_agent(), timeout=CALL_TIMEOUT))
        calls.append(replica.agent.RecordUsage(request, metadata=broker.as_agent(), timeout=CALL_TIMEOUT))
    replies = await asyncio.gather(*calls)
    for i in range(50):
        here, there = replies[2 * i], replies[2 * i + 1]
        assert sorted((here.duplicate, there.duplicate)) == [False, True], f"gen-{i}: exactly one counted"
        assert (here.spent_usd, here.remaining_usd, here.over_limit) == (
            there.spent_usd,
            there.remaining_usd,
            there.over_limit,
        ), f"gen-{i}: the duplicate repeats the first answer"
    total = sum(costs, Decimal(0))
    # Retried through the other replica afterwards: still nothing counted twice.
    retries = await asyncio.gather(
        *(
            (replica.agent if i % 2 == 0 else broker.agent).RecordUsage(
                usage("twice", f"gen-{i}", cost), metadata=broker.as_agent(), timeout=CALL_TIMEOUT
            )
            for i, cost in enumerate(costs)
        )
    )
    assert all(retry.duplicate for retry in retries)
    for stub in (broker.agent, replica.agent):
        spent, _ = await spent_and_reserved(stub, "twice", broker.as_agent())
        assert spent == total
    conn = await broker.db()
    try:
        rows = await conn.fetchval("SELECT count(*) FROM usage_ledger WHERE user_id = 'twice'")
        counted = await conn.fetchval("SELECT sum(request_count) FROM usage_periods WHERE user_id = 'twice'")
    finally:
        await conn.close()
    assert rows == 50 and counted == 50


async def cli_token(env: dict[str, str], *args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "broker",
        "token",
        *args,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, err.decode()
    return out.decode().strip()


async def test_a_token_created_through_one_replica_works_on_the_other(
    broker: Broker, replica: Replica
) -> None:
    await broker.provision("alice")
    request = pb.GetKeyRequest(user_id="alice")

    made_in_process = await broker.runtime.authority.create("made-in-process", "agent", "test")
    auth = (("authorization", f"Bearer {made_in_process.token}"),)
    key = await replica.agent.GetKey(request, metadata=auth, timeout=CALL_TIMEOUT)
    assert key.api_key.startswith("sk-or-v1-")
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await replica.admin.GetKeyInfo(
            pb.GetKeyInfoRequest(user_id="alice"), metadata=auth, timeout=CALL_TIMEOUT
        )
    assert_rpc_error(denied.value, grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")

    # Created by another process altogether (the command line on the same database).
    token = await cli_token(replica.env, "create", "--name", "made-by-cli", "--scope", "admin")
    auth = (("authorization", f"Bearer {token}"),)
    for admin in (broker.admin, replica.admin):
        info = await admin.GetKeyInfo(
            pb.GetKeyInfoRequest(user_id="alice"), metadata=auth, timeout=CALL_TIMEOUT
        )
        assert info.key.key_id == key.key_id

    # Revoked there: refused here at once (no token cache in the fixture), and by the replica
    # within its token cache time (5 s by default).
    assert "revoked" in await cli_token(replica.env, "revoke", "made-by-cli")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await broker.admin.GetKeyInfo(
            pb.GetKeyInfoRequest(user_id="alice"), metadata=auth, timeout=CALL_TIMEOUT
        )
    assert_rpc_error(refused.value, grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")

    async def replica_refuses() -> bool:
        try:
            await replica.admin.GetKeyInfo(
                pb.GetKeyInfoRequest(user_id="alice"), metadata=auth, timeout=CALL_TIMEOUT
            )
        except grpc.aio.AioRpcError as error:
            assert_rpc_error(error, grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")
            return True
        return False

    await eventually(replica_refuses, timeout=60, interval=0.25)
