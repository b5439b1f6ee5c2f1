"""The Python client against the real broker and the sandbox over HTTP: the agent's whole loop."""

from __future__ import annotations

from decimal import Decimal

import httpx
import pytest
from keybroker_client import (
    BudgetExceededError,
    KeyBrokerClient,
    MonthlyLimitExceededError,
    NoApiKeyError,
    OpenRouterError,
)

from broker.sandbox import Fault, Sandbox
from tests.conftest import Broker

PAYLOAD = {
    "model": "openai/gpt-4o-mini",
    "messages": [{"role": "user", "content": "Hello there!"}],
    "max_tokens": 8,
}


async def test_openrouter_chat_reserves_calls_and_records_usage_by_generation_id(
    broker: Broker, sandbox: Sandbox
) -> None:
    await broker.provision("agent-user", limit="5")
    async with KeyBrokerClient(broker.target, broker.agent_token) as client:
        reply = await client.openrouter_chat(
            "agent-user", PAYLOAD, agent="planner", openrouter_base_url=str(sandbox.base_url)
        )
        assert reply["id"].startswith("gen-")
        cost = reply["usage"]["cost"]
        assert isinstance(cost, Decimal) and cost > 0
        check = await client.check_limit("agent-user")
        assert Decimal(check.spent_usd) == cost, "the actual cost is recorded"
        assert Decimal(check.reserved_usd) == 0, "the reservation is settled"

        second = await client.openrouter_chat(
            "agent-user", PAYLOAD, agent="planner", openrouter_base_url=str(sandbox.base_url)
        )
        check = await client.check_limit("agent-user")
        assert Decimal(check.spent_usd) == cost + second["usage"]["cost"]
    async with KeyBrokerClient(broker.target, broker.admin_token) as admin:
        summary = await admin.get_usage_summary("agent-user")
        assert summary.total_requests == 2
        assert summary.by_agent[0].agent == "planner"
        assert summary.by_model[0].model == "openai/gpt-4o-mini"


async def test_a_failed_openrouter_call_releases_the_reservation(broker: Broker, sandbox: Sandbox) -> None:
    await broker.provision("flaky", limit="5")
    sandbox.faults.add(Fault(path_prefix="/api/v1/chat/completions", method="POST", status=502))
    async with KeyBrokerClient(broker.target, broker.agent_token) as client:
        with pytest.raises(OpenRouterError) as failed:
            await client.openrouter_chat("flaky", PAYLOAD, openrouter_base_url=str(sandbox.base_url))
        assert failed.value.status == 502
        check = await client.check_limit("flaky")
        assert Decimal(check.reserved_usd) == 0 and Decimal(check.spent_usd) == 0
        key = await client.get_key("flaky")
        assert key.api_key not in str(failed.value)


async def test_the_cached_key_is_refreshed_after_a_rotation(broker: Broker, sandbox: Sandbox) -> None:
    await broker.provision("rotating", limit="5")
    async with KeyBrokerClient(broker.target, broker.admin_token) as client:
        await client.openrouter_chat("rotating", PAYLOAD, openrouter_base_url=str(sandbox.base_url))
        first = await client.get_key_cached("rotating")
        async with KeyBrokerClient(broker.target, broker.admin_token) as other:  # another process rotates
            await other.rotate_key("rotating", request_id="rot-1")
        reply = await client.openrouter_chat("rotating", PAYLOAD, openrouter_base_url=str(sandbox.base_url))
        assert reply["id"].startswith("gen-"), "the new key is fetched because CheckLimit reports version 2"
        current = await client.get_key_cached("rotating")
        assert current.key_version == first.key_version + 1
        async with httpx.AsyncClient() as http:
            old = await http.post(
                f"{sandbox.base_url}/chat/completions",
                json=PAYLOAD,
                headers={"authorization": f"Bearer {first.api_key}"},
            )
        assert old.status_code == 401


async def test_budget_and_unknown_user_errors_are_typed(broker: Broker, sandbox: Sandbox) -> None:
    await broker.provision("poor", limit="0.0000001")
    async with KeyBrokerClient(broker.target, broker.agent_token) as client:
        with pytest.raises(BudgetExceededError):
            await client.openrouter_chat("poor", PAYLOAD, openrouter_base_url=str(sandbox.base_url))
        await client.record_usage("poor", request_id="r1", cost_usd=Decimal("1"))
        with pytest.raises(MonthlyLimitExceededError) as exhausted:
            await client.get_key("poor")
        assert exhausted.value.reason == "MONTHLY_LIMIT_EXCEEDED"
        assert exhausted.value.limit_usd == Decimal("0.0000001") and exhausted.value.usage_usd == Decimal(1)
        with pytest.raises(NoApiKeyError):
            await client.get_key("nobody")


async def test_a_401_is_reported_and_the_call_retried_once_with_the_new_key(
    broker: Broker, sandbox: Sandbox
) -> None:
    from broker.sandbox.state import KeyUpdate

    await broker.provision("revived", limit="5")
    async with KeyBrokerClient(broker.target, broker.agent_token) as client:
        old = await client.get_key_cached("revived")
        sandbox.state.update_key(old.key_id, KeyUpdate(disabled=True))  # OpenRouter now refuses it
        reply = await client.openrouter_chat("revived", PAYLOAD, openrouter_base_url=str(sandbox.base_url))
        assert reply["id"].startswith("gen-")
        current = await client.get_key_cached("revived")
        assert current.key_version == old.key_version + 1, "the broker confirmed the key dead and rotated"
        check = await client.check_limit("revived")
        assert Decimal(check.spent_usd) == reply["usage"]["cost"] and Decimal(check.reserved_usd) == 0
