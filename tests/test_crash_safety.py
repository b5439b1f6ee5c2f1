"""Every crash point of key creation and rotation (issue 3, item 2), each ending with exactly one
active key per user, no orphan at OpenRouter after one reconcile pass, and a working GetKey."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import grpc
import httpx
import pytest
from keybroker.v1 import keybroker_pb2 as pb

from broker.provisioning import SimulatedCrash
from broker.sandbox import Fault, Sandbox
from tests.conftest import Broker, TestClock
from tests.helpers import assert_rpc_error, eventually

CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def crash_at(point: str) -> Callable[[str], None]:
    def hook(reached: str) -> None:
        if reached == point:
            raise SimulatedCrash(point)

    return hook


def live_keys(sandbox: Sandbox, user: str) -> list[str]:
    return [
        k.hash for k in sandbox.state.all_keys() if k.name.startswith(f"keybroker:{user}:") and not k.deleted
    ]


def enabled_keys(sandbox: Sandbox, user: str) -> list[str]:
    return [
        k.hash
        for k in sandbox.state.all_keys()
        if k.name.startswith(f"keybroker:{user}:") and not k.deleted and not k.disabled
    ]


async def chat_status(sandbox: Sandbox, api_key: str) -> int:
    async with httpx.AsyncClient(timeout=5) as http:
        reply = await http.post(
            f"{sandbox.base_url}/chat/completions", json=CHAT, headers={"authorization": f"Bearer {api_key}"}
        )
    return reply.status_code


async def assert_one_working_key(broker: Broker, sandbox: Sandbox, user: str) -> pb.GetKeyResponse:
    """After recovery: one active key in the database, enabled at OpenRouter, and it works."""
    conn = await broker.db()
    try:
        active = await conn.fetchval(
            "SELECT count(*) FROM api_keys WHERE user_id = $1 AND status = 'active'", user
        )
    finally:
        await conn.close()
    assert active == 1
    key = await broker.agent.GetKey(pb.GetKeyRequest(user_id=user), metadata=broker.as_agent())
    assert enabled_keys(sandbox, user) == [key.key_id], "exactly the stored key is live at OpenRouter"
    assert await chat_status(sandbox, key.api_key) == 200
    return key


async def reconcile_once(broker: Broker, clock: TestClock) -> pb.ReconcileResponse:
    clock.offset += broker.runtime.settings.intent_timeout + timedelta(seconds=1)  # the attempt is dead
    return await broker.admin.Reconcile(pb.ReconcileRequest(), metadata=broker.as_admin(), timeout=30)


async def test_provider_5xx_on_create_leaves_nothing_and_a_retry_succeeds(
    broker: Broker, sandbox: Sandbox
) -> None:
    sandbox.faults.add(Fault(path_prefix="/api/v1/keys", method="POST", status=500))
    request = pb.ProvisionKeyRequest(user_id="u5xx", request_id="p-1")
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await broker.admin.ProvisionKey(request, metadata=broker.as_admin())
    assert_rpc_error(failed.value, grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE")
    assert live_keys(sandbox, "u5xx") == []
    await broker.admin.ProvisionKey(request, metadata=broker.as_admin())
    await assert_one_working_key(broker, sandbox, "u5xx")


@pytest.mark.parametrize("operation", ["provision", "rotate"])
async def test_a_lost_create_response_is_cleaned_up_at_once_and_a_retry_succeeds(
    broker: Broker, sandbox: Sandbox, operation: str
) -> None:
    if operation == "rotate":
        await broker.provision("lost")
    sandbox.faults.add(Fault(path_prefix="/api/v1/keys", method="POST", drop_response=True))
    call = (
        broker.admin.ProvisionKey(
            pb.ProvisionKeyRequest(user_id="lost", request_id="r-1"), metadata=broker.as_admin()
        )
        if operation == "provision"
        else broker.agent.RotateKey(
            pb.RotateKeyRequest(user_id="lost", request_id="r-1"), metadata=broker.as_agent()
        )
    )
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await call
    assert_rpc_error(failed.value, grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE")
    assert len(live_keys(sandbox, "lost")) == (0 if operation == "provision" else 1), "the orphan is gone"
    if operation == "provision":
        await broker.admin.ProvisionKey(
            pb.ProvisionKeyRequest(user_id="lost", request_id="r-1"), metadata=broker.as_admin()
        )
    else:
        await broker.agent.RotateKey(
            pb.RotateKeyRequest(user_id="lost", request_id="r-1"), metadata=broker.as_agent()
        )
    key = await assert_one_working_key(broker, sandbox, "lost")
    assert key.key_version == (1 if operation == "provision" else 2)


@pytest.mark.parametrize("operation", ["provision", "rotate"])
async def test_a_crash_after_create_before_commit_is_rolled_back_by_one_reconcile_pass(
    broker: Broker, sandbox: Sandbox, clock: TestClock, operation: str
) -> None:
    keys = broker.runtime.keys
    if operation == "rotate":
        await broker.provision("crashy")
        before = await broker.agent.GetKey(pb.GetKeyRequest(user_id="crashy"), metadata=broker.as_agent())
    keys.minter.crash_hook = crash_at("key_created")
    with pytest.raises(SimulatedCrash):
        if operation == "provision":
            await keys.provision("crashy", "free", None, "p-1", "test")
        else:
            await keys.rotate("crashy", "r-1", timedelta(0), False, "test")
    keys.minter.crash_hook = None
    assert len(live_keys(sandbox, "crashy")) == (1 if operation == "provision" else 2), "an orphan exists"
    if operation == "rotate":  # the user kept a working key all along
        current = await broker.agent.GetKey(pb.GetKeyRequest(user_id="crashy"), metadata=broker.as_agent())
        assert current.key_id == before.key_id and await chat_status(sandbox, current.api_key) == 200

    report = await reconcile_once(broker, clock)
    kinds = {pb.ReconcileFindingKind.Name(f.kind) for f in report.findings}
    assert "RECONCILE_FINDING_KIND_STALE_INTENT" in kinds and all(f.fixed for f in report.findings)
    assert len(live_keys(sandbox, "crashy")) == (0 if operation == "provision" else 1), "no orphan remains"
    if operation == "provision":
        await keys.provision("crashy", "free", None, "p-1", "test")  # the client's retry
    await assert_one_working_key(broker, sandbox, "crashy")


async def test_a_retry_of_the_same_request_takes_over_a_dead_attempt(
    broker: Broker, sandbox: Sandbox, clock: TestClock
) -> None:
    keys = broker.runtime.keys
    keys.minter.crash_hook = crash_at("key_created")
    with pytest.raises(SimulatedCrash):
        await keys.provision("retry", "free", None, "p-1", "test")
    keys.minter.crash_hook = None
    clock.offset += broker.runtime.settings.intent_timeout + timedelta(seconds=1)
    info = await keys.provision("retry", "free", None, "p-1", "test")
    assert info.key_version == 1
    assert live_keys(sandbox, "retry") == [info.key_id], "the dead attempt's key was removed first"
    await assert_one_working_key(broker, sandbox, "retry")


async def test_a_crash_after_commit_before_disabling_the_old_key_is_finished_in_the_background(
    broker: Broker, sandbox: Sandbox
) -> None:
    keys = broker.runtime.keys
    await broker.provision("halfway")
    old = await broker.agent.GetKey(pb.GetKeyRequest(user_id="halfway"), metadata=broker.as_agent())
    keys.minter.crash_hook = crash_at("rotation_committed")
    with pytest.raises(SimulatedCrash):
        await keys.rotate("halfway", "r-1", timedelta(0), False, "test")
    keys.minter.crash_hook = None

    async def old_key_refused() -> bool:
        return await chat_status(sandbox, old.api_key) == 401

    await eventually(old_key_refused, timeout=10)  # the background retirer, every 100 ms in tests
    key = await assert_one_working_key(broker, sandbox, "halfway")
    assert key.key_version == 2


async def test_a_provider_failure_when_disabling_the_old_key_is_retried_until_done(
    broker: Broker, sandbox: Sandbox
) -> None:
    await broker.provision("stubborn")
    old = await broker.agent.GetKey(pb.GetKeyRequest(user_id="stubborn"), metadata=broker.as_agent())
    sandbox.faults.add(Fault(path_prefix=f"/api/v1/keys/{old.key_id}", method="PATCH", status=500, times=12))
    rotated = await broker.agent.RotateKey(
        pb.RotateKeyRequest(user_id="stubborn", request_id="r-1"), metadata=broker.as_agent()
    )
    assert rotated.key_version == 2, "RotateKey succeeds; retiring the old key is deferred"
    assert await chat_status(sandbox, old.api_key) == 200, "still enabled while OpenRouter fails"

    async def old_key_refused() -> bool:
        return await chat_status(sandbox, old.api_key) == 401

    await eventually(old_key_refused, timeout=15)
    assert not sandbox.faults.pending(), "every injected failure was met by a retry"
    await assert_one_working_key(broker, sandbox, "stubborn")
