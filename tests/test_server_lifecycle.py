"""Health, draining, SIGTERM, and the embedded default (`keybroker serve` with nothing set)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from keybroker.v1 import keybroker_pb2 as pb
from keybroker.v1 import keybroker_pb2_grpc as pb_grpc

from broker.sandbox import Fault, Sandbox
from tests.conftest import Broker

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def test_health_reports_serving_overall_and_per_service(broker: Broker) -> None:
    stub = health_pb2_grpc.HealthStub(broker.channel)
    for service in ("", "keybroker.v1.KeyBroker", "keybroker.v1.KeyBrokerAdmin"):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == SERVING, service


async def test_draining_turns_health_not_serving_and_lets_in_flight_calls_finish(
    broker: Broker, sandbox: Sandbox
) -> None:
    health = health_pb2_grpc.HealthStub(broker.channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
    assert (await watch.read()).status == SERVING
    # Slow the provider so that ProvisionKey is in flight when the drain starts.
    sandbox.faults.add(Fault(path_prefix="/api/v1/keys", method="POST", delay_seconds=1.0))
    in_flight = asyncio.ensure_future(broker.provision("draining-user"))
    await asyncio.wait_for(sandbox.faults.wait_fired(), 10)  # the call is now held at the sandbox
    stopping = asyncio.ensure_future(broker.server.stop(grace=5.0))
    assert (await watch.read()).status == NOT_SERVING
    info = await in_flight
    assert info.user_id == "draining-user" and info.key_version == 1
    await stopping


def broker_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYBROKER_", "OPENROUTER_"))}
    env.update(KEYBROKER_DATA_DIR=str(data_dir), KEYBROKER_LISTEN="127.0.0.1:0", KEYBROKER_LOG_FORMAT="json")
    return env


async def read_until(
    stream: asyncio.StreamReader, pattern: str, seen: list[str], timeout: float = 60
) -> re.Match[str]:
    async def scan() -> re.Match[str]:
        while True:
            line = (await stream.readline()).decode()
            if not line:
                raise AssertionError("process ended before printing " + pattern + ":\n" + "".join(seen))
            seen.append(line)
            match = re.search(pattern, line)
            if match:
                return match

    return await asyncio.wait_for(scan(), timeout)


async def test_serve_on_embedded_defaults_then_sigterm(tmp_path: Path) -> None:
    """What `make run` does: no database URL, no management key -> embedded PostgreSQL + sandbox."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "broker",
        "serve",
        env=broker_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout and proc.stderr
    logs: list[str] = []
    try:
        port = int((await read_until(proc.stderr, r"listening on port (\d+)", logs)).group(1))
        sandbox_warning = [line for line in logs if "SANDBOX" in line]
        assert sandbox_warning, "the sandbox is announced loudly"
        printed: list[str] = []
        await read_until(proc.stdout, r"KeyBroker/CheckLimit", printed)
        assert any("grpcurl" in line for line in printed)
        token_file = tmp_path / "dev-token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert stat.S_IMODE((tmp_path / "master.key").stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        assert token not in "".join(printed), "the token stays in its file"

        auth = (("authorization", f"Bearer {token}"),)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            admin, agent = pb_grpc.KeyBrokerAdminStub(channel), pb_grpc.KeyBrokerStub(channel)
            await admin.ProvisionKey(
                pb.ProvisionKeyRequest(user_id="alice", request_id="r1"), metadata=auth, timeout=30
            )
            key = await agent.GetKey(pb.GetKeyRequest(user_id="alice"), metadata=auth, timeout=10)
            assert key.api_key.startswith("sk-or-v1-") and key.limit_usd == "10"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        rest = (await proc.stderr.read()).decode()
        assert "draining" in rest
        assert key.api_key not in "".join(logs) + rest, "no secret in the logs"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
