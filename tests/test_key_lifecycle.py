"""The key lifecycle through the real server and the sandbox over HTTP: provision, disclose, rotate
(with and without grace), revoke, update, list, usage summaries and the audit trail."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import duration_pb2
from keybroker.v1 import keybroker_pb2 as pb

from broker.openrouter import loads_json
from broker.sandbox import Sandbox
from broker.sandbox.state import SandboxKey
from tests.conftest import Broker, TestClock
from tests.helpers import assert_invalid_argument, assert_rpc_error, eventually

CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}]}


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=5) as client:
        yield client


async def chat(http: httpx.AsyncClient, sandbox: Sandbox, api_key: str) -> int:
    """Status of one completion at the sandbox with `api_key` as an agent would call it."""
    reply = await http.post(
        f"{sandbox.base_url}/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {api_key}"}
    )
    if reply.status_code == 200:
        assert loads_json(reply.content)["usage"]["cost"] > 0
    return reply.status_code


def provider_key(sandbox: Sandbox, key_id: str) -> SandboxKey:
    [key] = [key for key in sandbox.state.all_keys() if key.hash == key_id]
    return key


def live_keys(sandbox: Sandbox, name_prefix: str = "") -> list[SandboxKey]:
    return [k for k in sandbox.state.all_keys() if not k.deleted and k.name.startswith(name_prefix)]


async def get_key(broker: Broker, user: str) -> pb.GetKeyResponse:
    return await broker.agent.GetKey(pb.GetKeyRequest(user_id=user), metadata=broker.as_agent(), timeout=10)


async def rotate(
    broker: Broker, user: str, request_id: str, grace_seconds: int = 0, delete_old: bool = False
) -> pb.RotateKeyResponse:
    request = pb.RotateKeyRequest(
        user_id=user,
        request_id=request_id,
        grace_period=duration_pb2.Duration(seconds=grace_seconds),
        delete_old=delete_old,
    )
    return await broker.agent.RotateKey(request, metadata=broker.as_agent(), timeout=10)


async def update(broker: Broker, user: str, **fields: Any) -> pb.KeyInfo:
    reply = await broker.admin.UpdateKey(
        pb.UpdateKeyRequest(user_id=user, **fields), metadata=broker.as_admin(), timeout=10
    )
    return reply.key


async def record(broker: Broker, user: str, request_id: str, cost: str, **extra: Any) -> None:
    request = pb.RecordUsageRequest(
        user_id=user, request_id=request_id, cost_usd=cost, prompt_tokens=10, completion_tokens=5, **extra
    )
    await broker.agent.RecordUsage(request, metadata=broker.as_agent(), timeout=10)


async def refused(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call
    return error.value


# --- provisioning --------------------------------------------------------------------------------


async def test_provision_returns_key_info_without_the_secret_and_a_monthly_capped_provider_key(
    broker: Broker, sandbox: Sandbox
) -> None:
    before = datetime.now(UTC)
    reply = await broker.admin.ProvisionKey(
        pb.ProvisionKeyRequest(user_id="alice", tier="standard", request_id="p-1"), metadata=broker.as_admin()
    )
    info = reply.key
    assert (info.user_id, info.key_version, info.tier, info.status) == (
        "alice",
        1,
        "standard",
        pb.KEY_STATUS_ACTIVE,
    )
    assert (info.limit_usd, info.unlimited, info.spent_usd, info.custom_limit_usd) == ("50", False, "0", "")
    assert info.create_time == info.rotate_time
    assert before - timedelta(seconds=1) <= info.create_time.ToDatetime(tzinfo=UTC) <= datetime.now(UTC)

    [key] = sandbox.state.all_keys()
    assert key.hash == info.key_id and key.name == "keybroker:alice:v1"
    assert (key.limit, key.limit_reset, key.disabled) == (Decimal(50), "monthly", False)
    for text in (str(reply), reply.SerializeToString().decode("latin-1")):
        assert key.secret not in text and key.secret.removeprefix("sk-or-v1-") not in text

    custom = await broker.provision("bob", tier="free", limit="7.25")
    assert (custom.limit_usd, custom.custom_limit_usd, custom.tier) == ("7.25", "7.25", "free")
    assert provider_key(sandbox, custom.key_id).limit == Decimal("7.25")
    assert provider_key(sandbox, custom.key_id).limit_reset == "monthly"


async def test_the_disclosed_key_works_at_chat_and_carries_the_monthly_limit_at_the_provider(
    broker: Broker, sandbox: Sandbox, http: httpx.AsyncClient
) -> None:
    info = await broker.provision("alice", tier="free")
    key = await get_key(broker, "alice")
    assert key.api_key.startswith("sk-or-v1-") and key.key_id == info.key_id and key.key_version == 1
    assert (key.limit_usd, key.spent_usd, key.remaining_usd, key.unlimited) == ("10", "0", "10", False)
    assert await chat(http, sandbox, key.api_key) == 200

    managed = await http.get(
        f"{sandbox.base_url}/keys/{key.key_id}", headers={"Authorization": f"Bearer {sandbox.management_key}"}
    )
    data = loads_json(managed.content)["data"]
    assert (data["limit"], data["limit_reset"], data["disabled"]) == (10, "monthly", False)
    assert data["usage"] > 0, "the completion was charged to this very key"


async def test_unlimited_tiers_get_no_provider_limit_unless_a_custom_limit_is_set(
    broker: Broker, sandbox: Sandbox
) -> None:
    admin, future, capped = await asyncio.gather(
        broker.provision("root", tier="admin"),
        broker.provision("later", tier="future4200"),
        broker.provision("capped", tier="admin", limit="3"),
    )
    for info in (admin, future):
        assert info.unlimited and info.limit_usd == ""
        key = provider_key(sandbox, info.key_id)
        assert key.limit is None and key.limit_reset is None
    assert not capped.unlimited and capped.limit_usd == "3"
    assert provider_key(sandbox, capped.key_id).limit == Decimal(3)
    assert provider_key(sandbox, capped.key_id).limit_reset == "monthly"


async def test_provision_retry_returns_the_same_key_and_another_request_is_key_exists(
    broker: Broker, sandbox: Sandbox
) -> None:
    request = pb.ProvisionKeyRequest(user_id="alice", tier="micro", request_id="p-1")
    first = await broker.admin.ProvisionKey(request, metadata=broker.as_admin())
    again = await broker.admin.ProvisionKey(request, metadata=broker.as_admin())
    assert again.key == first.key
    assert len(sandbox.state.all_keys()) == 1, "a retry creates no second provider key"

    other = pb.ProvisionKeyRequest(user_id="alice", tier="micro", request_id="p-2")
    error = await refused(broker.admin.ProvisionKey(other, metadata=broker.as_admin()))
    info = assert_rpc_error(error, grpc.StatusCode.ALREADY_EXISTS, "KEY_EXISTS")
    assert info.metadata["user_id"] == "alice"
    assert len(sandbox.state.all_keys()) == 1


async def test_concurrent_provisioning_leaves_exactly_one_live_provider_key(
    broker: Broker, sandbox: Sandbox
) -> None:
    same = pb.ProvisionKeyRequest(user_id="carol", tier="free", request_id="p-carol")
    retries = await asyncio.gather(
        *(broker.admin.ProvisionKey(same, metadata=broker.as_admin(), timeout=10) for _ in range(8))
    )
    assert len({r.key.key_id for r in retries}) == 1
    assert [k.hash for k in live_keys(sandbox, "keybroker:carol:")] == [retries[0].key.key_id]

    distinct = [pb.ProvisionKeyRequest(user_id="dan", tier="free", request_id=f"p-dan-{i}") for i in range(6)]
    outcomes = await asyncio.gather(
        *(broker.admin.ProvisionKey(r, metadata=broker.as_admin(), timeout=10) for r in distinct),
        return_exceptions=True,
    )
    winners = [o for o in outcomes if isinstance(o, pb.ProvisionKeyResponse)]
    losers = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(winners) == 1 and len(losers) == 5
    for error in losers:
        assert_rpc_error(error, grpc.StatusCode.ALREADY_EXISTS, "KEY_EXISTS")
    assert [k.hash for k in live_keys(sandbox, "keybroker:dan:")] == [winners[0].key.key_id]


# --- rotation ------------------------------------------------------------------------------------


async def test_rotation_without_grace_switches_keys_at_once_and_a_retry_returns_the_same_result(
    broker: Broker, sandbox: Sandbox, http: httpx.AsyncClient
) -> None:
    await broker.provision("alice")
    old = await get_key(broker, "alice")
    rotation = await rotate(broker, "alice", "rot-1")
    assert rotation.key_version == 2 and rotation.previous_key_id == old.key_id
    assert rotation.key_id != old.key_id
    assert rotation.previous_key_expire_time.ToDatetime(tzinfo=UTC) <= datetime.now(UTC)

    new = await get_key(broker, "alice")
    assert (new.key_id, new.key_version) == (rotation.key_id, 2) and new.api_key != old.api_key
    assert await chat(http, sandbox, new.api_key) == 200
    assert await chat(http, sandbox, old.api_key) == 401
    retired = provider_key(sandbox, old.key_id)
    assert retired.disabled and not retired.deleted, "without delete_old the old key is disabled"

    assert await rotate(broker, "alice", "rot-1") == rotation, "a retry returns the first result"
    assert len(sandbox.state.all_keys()) == 2, "and creates no provider key"
    third = await rotate(broker, "alice", "rot-2")
    assert third.key_version == 3 and third.previous_key_id == rotation.key_id
    assert await rotate(broker, "alice", "rot-1") == rotation, "even after a later rotation"
    assert len(sandbox.state.all_keys()) == 3

    check = await broker.agent.CheckLimit(pb.CheckLimitRequest(user_id="alice"), metadata=broker.as_agent())
    assert check.key_version == 3
    listed = await broker.admin.ListKeys(pb.ListKeysRequest(), metadata=broker.as_admin())
    [info] = listed.keys
    assert info.key_version == 3 and info.key_id == third.key_id
    assert info.rotate_time.ToDatetime() > info.create_time.ToDatetime()


async def test_mid_month_rotation_gives_the_new_provider_key_what_is_left(
    broker: Broker, sandbox: Sandbox
) -> None:
    await broker.provision("alice", tier="free")
    await record(broker, "alice", "gen-1", "3.25")
    await record(broker, "alice", "gen-2", "0.0000000001")
    rotation = await rotate(broker, "alice", "rot-1")
    key = provider_key(sandbox, rotation.key_id)
    assert (key.limit, key.limit_reset) == (Decimal("6.7499999999"), "monthly")

    # A later limit change keeps counting the spend from before this key existed.
    await update(broker, "alice", monthly_limit_usd="20")
    assert provider_key(sandbox, rotation.key_id).limit == Decimal("16.7499999999")


async def test_in_the_month_after_a_mid_month_rotation_reconcile_restores_the_full_provider_limit(
    broker: Broker, sandbox: Sandbox, clock: TestClock
) -> None:
    """The remainder is the new key's cap for the rest of the month only: next month the user has
    the full limit again, at the broker and (once reconciled) at OpenRouter."""
    clock.fixed = datetime(2026, 1, 20, 12, 0, tzinfo=UTC)
    await broker.provision("alice", tier="free")
    await record(broker, "alice", "gen-1", "9")
    rotation = await rotate(broker, "alice", "rot-1")
    assert provider_key(sandbox, rotation.key_id).limit == Decimal(1)

    clock.fixed = datetime(2026, 2, 2, 12, 0, tzinfo=UTC)
    key = await get_key(broker, "alice")
    assert key.remaining_usd == "10", "the broker grants the full limit in February"
    await broker.admin.Reconcile(pb.ReconcileRequest(), metadata=broker.as_admin(), timeout=30)
    assert provider_key(sandbox, rotation.key_id).limit == Decimal(10)
    assert provider_key(sandbox, rotation.key_id).limit_reset == "monthly"


async def test_rotation_with_grace_keeps_the_old_key_until_the_background_retirer_disables_it(
    broker: Broker, sandbox: Sandbox, clock: TestClock, http: httpx.AsyncClient
) -> None:
    await broker.provision("alice")
    old = await get_key(broker, "alice")
    rotation = await rotate(broker, "alice", "rot-1", grace_seconds=60)
    expires = rotation.previous_key_expire_time.ToDatetime(tzinfo=UTC) - datetime.now(UTC)
    assert timedelta(seconds=55) < expires <= timedelta(seconds=60)
    new = await get_key(broker, "alice")
    assert await chat(http, sandbox, old.api_key) == 200, "the old key works during the grace"
    assert await chat(http, sandbox, new.api_key) == 200

    clock.offset = timedelta(seconds=61)

    async def old_key_refused() -> bool:
        return await chat(http, sandbox, old.api_key) == 401

    await eventually(old_key_refused, timeout=10)
    retired = provider_key(sandbox, old.key_id)
    assert retired.disabled and not retired.deleted
    assert await chat(http, sandbox, new.api_key) == 200
    conn = await broker.db()
    try:
        actors = await conn.fetch(
            "SELECT actor FROM audit_log WHERE user_id = 'alice' AND action = 'key.retired'"
            " AND details->>'key_id' = $1",
            old.key_id,
        )
    finally:
        await conn.close()
    assert [row["actor"] for row in actors] == ["system"]


async def test_delete_old_deletes_the_previous_key_at_the_provider(
    broker: Broker, sandbox: Sandbox, clock: TestClock, http: httpx.AsyncClient
) -> None:
    await asyncio.gather(broker.provision("now"), broker.provision("later"))
    now_old, later_old = await asyncio.gather(get_key(broker, "now"), get_key(broker, "later"))
    await rotate(broker, "now", "rot-1", delete_old=True)
    assert provider_key(sandbox, now_old.key_id).deleted
    assert await chat(http, sandbox, now_old.api_key) == 401

    await rotate(broker, "later", "rot-1", grace_seconds=30, delete_old=True)
    assert not provider_key(sandbox, later_old.key_id).deleted
    clock.offset = timedelta(seconds=31)

    async def deleted() -> bool:
        return provider_key(sandbox, later_old.key_id).deleted

    await eventually(deleted, timeout=10)
    assert await chat(http, sandbox, later_old.api_key) == 401


async def test_concurrent_retirers_record_one_retirement(broker: Broker, clock: TestClock) -> None:
    """Replicas (or the background task racing RevokeKey) may retire the same key at once; the
    audit log says it happened once."""
    await broker.provision("alice")
    old = await get_key(broker, "alice")
    await rotate(broker, "alice", "rot-1", grace_seconds=3600)
    clock.offset = timedelta(hours=2)
    await asyncio.gather(*(broker.runtime.keys.retire_due() for _ in range(4)))  # four replicas
    conn = await broker.db()
    try:
        rows = await conn.fetchval(
            "SELECT count(*) FROM audit_log WHERE action = 'key.retired' AND details->>'key_id' = $1",
            old.key_id,
        )
    finally:
        await conn.close()
    assert rows == 1


# --- revocation ----------------------------------------------------------------------------------


async def test_revoke_refuses_the_key_everywhere_and_ends_the_grace_of_earlier_keys(
    broker: Broker, sandbox: Sandbox, http: httpx.AsyncClient
) -> None:
    await broker.provision("alice")
    first = await get_key(broker, "alice")
    await rotate(broker, "alice", "rot-1", grace_seconds=3600)
    second = await get_key(broker, "alice")
    assert await chat(http, sandbox, first.api_key) == 200

    reply = await broker.admin.RevokeKey(pb.RevokeKeyRequest(user_id="alice"), metadata=broker.as_admin())
    assert reply.key.status == pb.KEY_STATUS_REVOKED and reply.key.key_version == 2
    assert_rpc_error(
        await refused(get_key(broker, "alice")), grpc.StatusCode.FAILED_PRECONDITION, "KEY_DISABLED"
    )
    for estimate in ("", "0.01"):
        check = pb.CheckLimitRequest(user_id="alice", estimated_cost_usd=estimate)
        error = await refused(broker.agent.CheckLimit(check, metadata=broker.as_agent()))
        assert_rpc_error(error, grpc.StatusCode.FAILED_PRECONDITION, "KEY_DISABLED")
    assert await chat(http, sandbox, second.api_key) == 401
    assert await chat(http, sandbox, first.api_key) == 401, "revocation also ends an earlier key's grace"
    assert provider_key(sandbox, second.key_id).disabled and not provider_key(sandbox, second.key_id).deleted

    listed = await broker.admin.ListKeys(pb.ListKeysRequest(), metadata=broker.as_admin())
    assert [(k.user_id, k.status) for k in listed.keys] == [("alice", pb.KEY_STATUS_REVOKED)]
    again = await broker.admin.RevokeKey(pb.RevokeKeyRequest(user_id="alice"), metadata=broker.as_admin())
    assert again.key == reply.key, "revoking a revoked key changes nothing"


async def test_provision_after_revoke_issues_a_working_version_2(
    broker: Broker, sandbox: Sandbox, http: httpx.AsyncClient
) -> None:
    first = await broker.provision("alice", tier="standard")
    old = await get_key(broker, "alice")
    await broker.admin.RevokeKey(
        pb.RevokeKeyRequest(user_id="alice", delete=True), metadata=broker.as_admin()
    )
    assert provider_key(sandbox, first.key_id).deleted

    reply = await broker.admin.ProvisionKey(
        pb.ProvisionKeyRequest(user_id="alice", tier="operator", request_id="p-again"),
        metadata=broker.as_admin(),
    )
    info = reply.key
    assert (info.key_version, info.status, info.tier, info.limit_usd) == (
        2,
        pb.KEY_STATUS_ACTIVE,
        "operator",
        "250",
    )
    assert info.key_id != first.key_id
    new = await get_key(broker, "alice")
    assert new.key_id == info.key_id and new.key_version == 2
    assert await chat(http, sandbox, new.api_key) == 200
    assert await chat(http, sandbox, old.api_key) == 401
    assert provider_key(sandbox, info.key_id).name == "keybroker:alice:v2"


# --- updates -------------------------------------------------------------------------------------


async def test_update_keeps_the_provider_limit_in_step_with_tier_and_custom_limit(
    broker: Broker, sandbox: Sandbox
) -> None:
    info = await broker.provision("alice", tier="standard")
    key_id = info.key_id

    def provider_limit() -> tuple[Decimal | None, str | None]:
        key = provider_key(sandbox, key_id)
        return key.limit, key.limit_reset

    assert provider_limit() == (Decimal(50), "monthly")
    changed = await update(broker, "alice", tier="operator")
    assert (changed.tier, changed.limit_usd, changed.custom_limit_usd) == ("operator", "250", "")
    assert provider_limit() == (Decimal(250), "monthly")
    changed = await update(broker, "alice", monthly_limit_usd="12.5")
    assert (changed.tier, changed.limit_usd, changed.custom_limit_usd) == ("operator", "12.5", "12.5")
    assert provider_limit() == (Decimal("12.5"), "monthly")
    changed = await update(broker, "alice", monthly_limit_usd="")
    assert (changed.limit_usd, changed.custom_limit_usd) == ("250", "")
    assert provider_limit() == (Decimal(250), "monthly")
    changed = await update(broker, "alice", tier="admin")
    assert changed.unlimited and changed.limit_usd == ""
    assert provider_limit() == (None, None)
    changed = await update(broker, "alice", tier="free")
    assert changed.limit_usd == "10" and provider_limit() == (Decimal(10), "monthly")
    assert changed.key_id == key_id and changed.key_version == 1, "updates never replace the key"


async def test_update_disabled_suspends_and_resumes_the_key(
    broker: Broker, sandbox: Sandbox, http: httpx.AsyncClient
) -> None:
    await broker.provision("alice")
    key = await get_key(broker, "alice")
    suspended = await update(broker, "alice", disabled=True)
    assert suspended.status == pb.KEY_STATUS_DISABLED
    assert_rpc_error(
        await refused(get_key(broker, "alice")), grpc.StatusCode.FAILED_PRECONDITION, "KEY_DISABLED"
    )
    error = await refused(rotate(broker, "alice", "rot-1"))
    assert_rpc_error(error, grpc.StatusCode.FAILED_PRECONDITION, "KEY_DISABLED")
    assert await chat(http, sandbox, key.api_key) == 401
    assert provider_key(sandbox, key.key_id).disabled

    resumed = await update(broker, "alice", disabled=False)
    assert resumed.status == pb.KEY_STATUS_ACTIVE and resumed.key_id == key.key_id
    again = await get_key(broker, "alice")
    assert again.api_key == key.api_key and again.key_version == 1
    assert await chat(http, sandbox, key.api_key) == 200


# --- listing and summaries -----------------------------------------------------------------------


async def test_list_keys_pages_in_user_order_without_duplicates(broker: Broker, sandbox: Sandbox) -> None:
    users = [f"user-{i:02d}" for i in range(25)]
    await asyncio.gather(*(broker.provision(u) for u in random.Random(7).sample(users, len(users))))

    async def pages(size: int) -> list[list[str]]:
        found: list[list[str]] = []
        token = ""
        for _ in range(30):
            reply = await broker.admin.ListKeys(
                pb.ListKeysRequest(page_size=size, page_token=token), metadata=broker.as_admin()
            )
            found.append([k.user_id for k in reply.keys])
            secrets_seen = [s.secret for s in sandbox.state.all_keys() if s.secret in str(reply)]
            assert not secrets_seen, "ListKeys never returns a secret"
            token = reply.next_page_token
            if not token:
                return found
        raise AssertionError("ListKeys never ended")

    tens = await pages(10)
    assert [len(p) for p in tens] == [10, 10, 5]
    assert [u for p in tens for u in p] == users
    assert [len(p) for p in await pages(5)] == [5] * 5, "no empty page after an exact multiple"
    assert await pages(0) == [users], "page_size 0 is the default of 100"
    assert await pages(1000) == [users]

    error = await refused(
        broker.admin.ListKeys(pb.ListKeysRequest(page_token="not a token"), metadata=broker.as_admin())
    )
    assert_invalid_argument(error, "page_token")


async def test_usage_summary_totals_and_breakdowns_are_exact(broker: Broker, clock: TestClock) -> None:
    clock.fixed = datetime(2026, 1, 20, 12, 0, tzinfo=UTC)
    await broker.provision("alice", tier="beta")
    await record(broker, "alice", "jan-1", "9.99", model="openai/gpt-4o", agent="planner")
    clock.fixed = datetime(2026, 2, 3, 8, 0, tzinfo=UTC)
    calls = [
        ("openai/gpt-4o", "planner", "0.10", 10, 5, 0),
        ("openai/gpt-4o", "coder", "0.25", 20, 7, 0),
        ("anthropic/claude-sonnet-4", "planner", "1.5", 300, 100, 450),
        ("anthropic/claude-sonnet-4", "", "0.000123", 1, 1, 0),
        ("sandbox/free", "coder", "0", 4, 4, 0),
    ]
    await asyncio.gather(
        *(
            broker.agent.RecordUsage(
                pb.RecordUsageRequest(
                    user_id="alice", request_id=f"gen-{i}", model=model, agent=agent, cost_usd=cost,
                    prompt_tokens=prompt, completion_tokens=completion, total_tokens=total,
                ),
                metadata=broker.as_agent(),
            )
            for i, (model, agent, cost, prompt, completion, total) in enumerate(calls)
        )
    )  # fmt: skip
    await record(broker, "alice", "gen-0", "0.10", model="openai/gpt-4o", agent="planner")  # a retry

    summary = await broker.admin.GetUsageSummary(
        pb.GetUsageSummaryRequest(user_id="alice"), metadata=broker.as_admin()
    )
    assert summary.month == "2026-02"
    assert summary.total_requests == 5 and summary.total_cost_usd == "1.850123"
    assert (summary.prompt_tokens, summary.completion_tokens) == (335, 117)
    assert summary.total_tokens == 15 + 27 + 450 + 2 + 8
    assert [(m.model, m.requests, m.tokens, m.cost_usd) for m in summary.by_model] == [
        ("anthropic/claude-sonnet-4", 2, 452, "1.500123"),
        ("openai/gpt-4o", 2, 42, "0.35"),
        ("sandbox/free", 1, 8, "0"),
    ]
    assert [(a.agent, a.requests, a.tokens, a.cost_usd) for a in summary.by_agent] == [
        ("planner", 2, 465, "1.6"),
        ("coder", 2, 35, "0.25"),
        ("", 1, 2, "0.000123"),
    ]
    for breakdown in (summary.by_model, summary.by_agent):
        assert sum(Decimal(g.cost_usd) for g in breakdown) == Decimal(summary.total_cost_usd)
        assert sum(g.requests for g in breakdown) == summary.total_requests
        assert sum(g.tokens for g in breakdown) == summary.total_tokens

    explicit = await broker.admin.GetUsageSummary(
        pb.GetUsageSummaryRequest(user_id="alice", month="2026-02"), metadata=broker.as_admin()
    )
    assert explicit == summary
    january = await broker.admin.GetUsageSummary(
        pb.GetUsageSummaryRequest(user_id="alice", month="2026-01"), metadata=broker.as_admin()
    )
    assert (january.total_requests, january.total_cost_usd, january.total_tokens) == (1, "9.99", 15)
    empty = await broker.admin.GetUsageSummary(
        pb.GetUsageSummaryRequest(user_id="alice", month="2025-12"), metadata=broker.as_admin()
    )
    assert (empty.total_requests, empty.total_cost_usd, list(empty.by_model)) == (0, "0", [])


# --- audit ---------------------------------------------------------------------------------------


async def test_every_disclosure_and_admin_change_is_audited_with_actor_action_and_user(
    broker: Broker,
) -> None:
    await broker.provision("alice")
    await broker.provision("bob")
    for _ in range(3):
        await get_key(broker, "alice")
    await broker.agent.GetKey(pb.GetKeyRequest(user_id="alice"), metadata=broker.as_admin())  # admin scope
    await update(broker, "alice", tier="standard")
    await rotate(broker, "alice", "rot-1")
    await broker.admin.RevokeKey(pb.RevokeKeyRequest(user_id="alice"), metadata=broker.as_admin())
    await refused(get_key(broker, "alice"))  # refused: not a disclosure
    await get_key(broker, "bob")

    conn = await broker.db()
    try:
        rows = await conn.fetch(
            "SELECT user_id, actor, action, details, event_time FROM audit_log WHERE user_id <> ''"
        )
    finally:
        await conn.close()
    seen = Counter((r["user_id"], r["actor"], r["action"]) for r in rows if r["action"] != "key.retired")
    assert seen == Counter(
        {
            ("alice", "test-admin", "key.provisioned"): 1,
            ("alice", "test-agent", "key.disclosed"): 3,
            ("alice", "test-admin", "key.disclosed"): 1,
            ("alice", "test-admin", "key.updated"): 1,
            ("alice", "test-agent", "key.rotated"): 1,
            ("alice", "test-admin", "key.revoked"): 1,
            ("bob", "test-admin", "key.provisioned"): 1,
            ("bob", "test-agent", "key.disclosed"): 1,
        }
    )
    retired = {(r["user_id"], r["actor"]) for r in rows if r["action"] == "key.retired"}
    assert retired == {("alice", "system")}, "the rotated-away and the revoked key were retired"
    now = datetime.now(UTC)
    assert all(now - timedelta(minutes=1) < r["event_time"] <= now for r in rows)
