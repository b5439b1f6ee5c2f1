"""The Node.js client example (clients/node) against the live broker and the sandbox over HTTP.

Runs `node clients/node/example.js` as a real subprocess: it loads protos/ at run time, calls GetKey,
CheckLimit, the sandbox's /chat/completions and RecordUsage. Skipped when `node` is not installed;
installs the pinned npm dependencies (`npm ci`) on first use.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from decimal import Decimal
from pathlib import Path

import pytest
from keybroker.v1 import keybroker_pb2 as pb

from broker.sandbox import Sandbox
from broker.sandbox.chat import ChatRequest, usage_for
from tests.conftest import Broker

ROOT = Path(__file__).resolve().parent.parent
CLIENT_DIR = ROOT / "clients" / "node"
NODE = shutil.which("node")
NPM = shutil.which("npm")
REQUIRED_PACKAGES = ("@grpc/grpc-js", "@grpc/proto-loader", "protobufjs")
MODEL = "openai/gpt-4o-mini"
PROMPT = "Say hi!!"  # 8 characters: 2 prompt tokens at the sandbox, so the exact cost is 0.00000990

pytestmark = pytest.mark.skipif(NODE is None, reason="node is not on PATH")


async def run(
    *argv: str, env: dict[str, str] | None = None, cwd: Path = ROOT, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run a command without blocking the event loop that serves the broker."""
    return await asyncio.to_thread(
        subprocess.run,
        list(argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
        check=False,
    )


@pytest.fixture(scope="session")
async def node_deps() -> None:
    """clients/node/node_modules from the committed package-lock.json (`npm ci`), once."""
    modules = CLIENT_DIR / "node_modules"
    if all((modules / name / "package.json").is_file() for name in REQUIRED_PACKAGES):
        return
    if NPM is None:
        pytest.skip("npm is not on PATH and clients/node/node_modules is missing")
    installed = await run(NPM, "ci", "--no-audit", "--no-fund", cwd=CLIENT_DIR, timeout=110)
    assert installed.returncode == 0, installed.stderr[-2000:]


def example_env(broker: Broker, sandbox: Sandbox, user: str) -> dict[str, str]:
    """A clean environment: no inherited KEYBROKER_/OPENROUTER_ settings and no proxies."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("KEYBROKER_", "OPENROUTER_")) and not k.lower().endswith("_proxy")
    }
    env.update(
        KEYBROKER_TARGET=broker.target,
        KEYBROKER_TOKEN=broker.agent_token,
        KEYBROKER_USER=user,
        OPENROUTER_BASE_URL=str(sandbox.base_url),
        OPENROUTER_MODEL=MODEL,
        KEYBROKER_PROMPT=PROMPT,
        KEYBROKER_ESTIMATE_USD="0.05",
        KEYBROKER_AGENT="node-test",
    )
    return env


async def run_example(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    assert NODE
    return await run(NODE, str(CLIENT_DIR / "example.js"), env=env)


async def test_node_example_records_the_exact_sandbox_cost(
    node_deps: None, broker: Broker, sandbox: Sandbox
) -> None:
    info = await broker.provision("node-user", tier="free", limit="5")
    expected_cost = usage_for(ChatRequest(MODEL, len(PROMPT), 256)).cost  # what the sandbox bills

    done = await run_example(example_env(broker, sandbox, "node-user"))

    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    summary = json.loads(lines[0])
    assert summary["generation_id"].startswith("gen-")
    assert summary["model"] == MODEL and summary["prompt_tokens"] == 2
    # Exact: the raw JSON text 0.00000990 reached the broker without a float in between.
    assert summary["cost_usd"] == "0.0000099" and Decimal(summary["cost_usd"]) == expected_cost
    assert summary["duplicate"] is False and summary["over_limit"] is False
    assert Decimal(summary["spent_usd"]) == expected_cost
    assert summary["reservation_id"], "CheckLimit reserved the estimate"
    assert summary["key_id"] == info.key_id and summary["key_version"] == "1"
    api_key = (
        await broker.agent.GetKey(pb.GetKeyRequest(user_id="node-user"), metadata=broker.as_agent())
    ).api_key
    assert api_key not in done.stdout + done.stderr, "the example never prints the key"

    usage = await broker.admin.GetUsageSummary(
        pb.GetUsageSummaryRequest(user_id="node-user"), metadata=broker.as_admin(), timeout=10
    )
    assert usage.total_requests == 1
    assert Decimal(usage.total_cost_usd) == expected_cost == sandbox.state.get_key(info.key_id).usage
    assert usage.prompt_tokens == 2 and usage.completion_tokens == summary["completion_tokens"]
    assert [(m.model, m.requests) for m in usage.by_model] == [(MODEL, 1)]
    assert [(a.agent, a.requests) for a in usage.by_agent] == [("node-test", 1)]

    # The reservation was settled by RecordUsage, so nothing stays reserved.
    check = await broker.agent.CheckLimit(
        pb.CheckLimitRequest(user_id="node-user"), metadata=broker.as_agent()
    )
    assert Decimal(check.reserved_usd or "0") == 0


async def test_node_example_fails_with_the_error_info_reason_for_an_unknown_user(
    node_deps: None, broker: Broker, sandbox: Sandbox
) -> None:
    done = await run_example(example_env(broker, sandbox, "nobody-here"))

    assert done.returncode != 0
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "NO_API_KEY" in lines[0] and "NOT_FOUND" in lines[0]
    assert sandbox.state.total_usage() == 0, "no completion without a key"


async def test_node_example_rejects_a_bad_token_as_unauthenticated(
    node_deps: None, broker: Broker, sandbox: Sandbox
) -> None:
    env = example_env(broker, sandbox, "node-user") | {"KEYBROKER_TOKEN": "kbt_not-a-real-token"}

    done = await run_example(env)

    assert done.returncode != 0
    assert "UNAUTHENTICATED" in done.stderr and "kbt_not-a-real-token" not in done.stderr


async def test_node_exact_json_helpers_never_use_floats(node_deps: None) -> None:
    assert NODE
    reply = r'{"s": "\"cost\": 9.9", "usage": {"prompt_tokens": 7, "cost": 7.5e-7}, "x": 0.00000990}'
    script = """
    const { parseJsonExact, plainDecimal } = require('./keybroker.js');
    const body = parseJsonExact(process.argv[1]);
    const out = { s: body.s, tokens: body.usage.prompt_tokens, raw: body.usage.cost,
                  cost: plainDecimal(body.usage.cost), x: plainDecimal(body.x),
                  big: plainDecimal('123456789012.0123456789'), int: plainDecimal(12) };
    process.stdout.write(JSON.stringify(out));
    """
    done = await run(NODE, "-e", script, reply, cwd=CLIENT_DIR)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "s": '"cost": 9.9',
        "tokens": 7,
        "raw": "7.5e-7",
        "cost": "0.00000075",
        "x": "0.0000099",
        "big": "123456789012.0123456789",
        "int": "12",
    }
