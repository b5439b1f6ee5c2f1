"""Issue 5.1: 2,400 concurrent RecordUsage calls with client retries while the broker is killed
with SIGKILL three times and restarted. Afterwards every request is in the ledger exactly once and
spend is exact; at every observation acknowledged <= spent <= attempted (Jepsen's counter check)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import asyncpg
import grpc
from keybroker.v1 import keybroker_pb2 as pb
from keybroker.v1 import keybroker_pb2_grpc as pb_grpc

from broker import crypto
from broker.sandbox import Sandbox
from tests.chaos.processes import BrokerProcess, broker_env, free_port
from tests.chaos.summary import record

CALLS = 2400
CONCURRENCY = 300
KILLS_AT = (0.2, 0.45, 0.7)  # fractions of acknowledged calls at which the broker is killed
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}


class Counter:
    """What the clients know: sums of acknowledged and of attempted costs."""

    def __init__(self) -> None:
        self.acknowledged = Decimal(0)
        self.attempted = Decimal(0)
        self.acks = 0
        self.retries = 0
        self.milestones = {round(fraction * CALLS): asyncio.Event() for fraction in KILLS_AT}

    def acknowledge(self, cost: Decimal) -> None:
        self.acknowledged += cost
        self.acks += 1
        if self.acks in self.milestones:
            self.milestones[self.acks].set()


def cost_of(i: int) -> Decimal:
    return Decimal("0.0001") * (i % 17 + 1) + Decimal("0.0000000001") * i


async def test_sigkill_under_load_loses_nothing_and_counts_each_request_once(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    scenario = record(
        "broker SIGKILL under load",
        f"{len(KILLS_AT)} x SIGKILL + restart during {CALLS} concurrent RecordUsage with retries",
    )
    port = free_port()
    env = broker_env(
        KEYBROKER_DATABASE_URL=database_url,
        KEYBROKER_MASTER_KEY=crypto.generate_master_key(),
        KEYBROKER_LISTEN=f"127.0.0.1:{port}",
        KEYBROKER_DATA_DIR=str(tmp_path),
        KEYBROKER_RECONCILE_INTERVAL="0",
        OPENROUTER_MANAGEMENT_KEY=sandbox.management_key,
        OPENROUTER_BASE_URL=str(sandbox.base_url),
    )
    broker = BrokerProcess(env, tmp_path / "broker.log")
    await broker.start()
    token = (
        await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "broker", "token", "create", "--name", "jepsen", "--scope", "admin"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
    ).stdout.strip()
    auth = (("authorization", f"Bearer {token}"),)
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(4)]
    stubs = [pb_grpc.KeyBrokerStub(channel) for channel in channels]
    admin = pb_grpc.KeyBrokerAdminStub(channels[0])
    await admin.ProvisionKey(
        pb.ProvisionKeyRequest(user_id="jepsen", tier="admin", request_id="p-1"), metadata=auth, timeout=30
    )
    counter = Counter()
    db = await asyncpg.connect(database_url)
    gate = asyncio.Semaphore(CONCURRENCY)
    done = asyncio.Event()
    observations: list[tuple[Decimal, Decimal, Decimal]] = []

    async def client(i: int) -> None:
        request = pb.RecordUsageRequest(
            user_id="jepsen", request_id=f"gen-{i}", cost_usd=str(cost_of(i)), model="m", prompt_tokens=1
        )
        async with gate:
            counter.attempted += cost_of(i)
            delay = 0.05
            while True:
                try:
                    await stubs[i % len(stubs)].RecordUsage(request, metadata=auth, timeout=5)
                    break
                except grpc.aio.AioRpcError as error:
                    assert error.code() in RETRYABLE, (error.code(), error.details())
                    counter.retries += 1
                    await asyncio.sleep(delay)  # back-off before the retry (not synchronisation)
                    delay = min(delay * 2, 1.0)
            counter.acknowledge(cost_of(i))

    async def observe() -> None:
        while not done.is_set():
            acknowledged = counter.acknowledged
            spent = await db.fetchval(
                "SELECT coalesce(sum(spent_usd), 0) FROM usage_periods WHERE user_id = 'jepsen'"
            )
            attempted = counter.attempted
            observations.append((acknowledged, spent, attempted))
            assert acknowledged <= spent <= attempted, (acknowledged, spent, attempted)
            await asyncio.sleep(0.02)

    async def killer() -> None:
        for milestone in counter.milestones.values():
            await milestone.wait()
            await broker.kill()
            await broker.start()

    observer = asyncio.create_task(observe())
    try:
        await asyncio.wait_for(asyncio.gather(killer(), *(client(i) for i in range(CALLS))), 600)
    finally:
        done.set()
        await observer
        for channel in channels:
            await channel.close()
        await broker.stop()
    rows = await db.fetchval("SELECT count(*) FROM usage_ledger WHERE user_id = 'jepsen'")
    distinct = await db.fetchval(
        "SELECT count(DISTINCT request_id) FROM usage_ledger WHERE user_id = 'jepsen'"
    )
    spent = await db.fetchval("SELECT spent_usd FROM usage_periods WHERE user_id = 'jepsen'")
    await db.close()
    expected = sum((cost_of(i) for i in range(CALLS)), Decimal(0))
    scenario.counted = (
        f"{rows} ledger rows for {CALLS} requests, spend {spent} = {expected}, "
        f"{counter.retries} client retries, {len(observations)} observations, {broker.starts - 1} restarts"
    )
    assert rows == distinct == CALLS
    assert spent == expected
    assert broker.starts == len(KILLS_AT) + 1 and len(observations) > 10
    scenario.passed = True
