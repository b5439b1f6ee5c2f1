"""The reconciler, ReportKeyInvalid, scheduled rotation, and background-task leadership."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import grpc
import httpx
import pytest
from google.protobuf import duration_pb2
from keybroker.v1 import keybroker_pb2 as pb

from broker.app import Runtime, open_runtime, serving
from broker.crypto import generate_master_key
from broker.sandbox import Sandbox
from broker.sandbox.state import KeyUpdate, NewKey
from broker.server import BrokerServer
from tests.conftest import Broker, TestClock, broker_settings
from tests.helpers import assert_rpc_error, eventually


@contextlib.asynccontextmanager
async def replica(
    database_url: str,
    sandbox: Sandbox,
    data_dir: Path,
    master_key: str,
    clock: TestClock | None = None,
    **overrides: object,
) -> AsyncIterator[tuple[Runtime, BrokerServer, grpc.aio.Channel]]:
    """One more broker process-equivalent on the same database (same master key, own pool)."""
    settings = broker_settings(database_url, sandbox, data_dir, master_key=master_key, **overrides)
    async with open_runtime(settings, clock or TestClock()) as runtime, serving(runtime) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield runtime, server, channel


CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}
Kind = pb.ReconcileFindingKind


async def reconcile(broker: Broker, dry_run: bool = False) -> pb.ReconcileResponse:
    return await broker.admin.Reconcile(
        pb.ReconcileRequest(dry_run=dry_run), metadata=broker.as_admin(), timeout=30
    )


def findings(report: pb.ReconcileResponse, kind: int) -> list[pb.ReconcileFinding]:
    return [f for f in report.findings if f.kind == kind]


def sandbox_key(sandbox: Sandbox, key_id: str):
    [key] = [k for k in sandbox.state.all_keys() if k.hash == key_id]
    return key


async def test_an_orphan_made_directly_at_openrouter_is_found_and_removed(
    broker: Broker, sandbox: Sandbox
) -> None:
    await broker.provision("alice")
    orphan = sandbox.state.create_key(NewKey(name="keybroker:alice:v9"))
    foreign = sandbox.state.create_key(NewKey(name="someone-elses-key"))
    dry = await reconcile(broker, dry_run=True)
    [found] = findings(dry, Kind.RECONCILE_FINDING_KIND_ORPHAN_KEY)
    assert found.key_id == orphan.hash and found.user_id == "alice" and not found.fixed
    assert not sandbox_key(sandbox, orphan.hash).deleted, "a dry run changes nothing"

    report = await reconcile(broker)
    [fixed] = findings(report, Kind.RECONCILE_FINDING_KIND_ORPHAN_KEY)
    assert fixed.fixed and sandbox_key(sandbox, orphan.hash).deleted
    assert not sandbox_key(sandbox, foreign.hash).deleted, "keys not named by keybroker are never touched"
    assert report.provider_keys >= 2 and report.database_keys == 1
    again = await reconcile(broker)
    assert not findings(again, Kind.RECONCILE_FINDING_KIND_ORPHAN_KEY)


async def test_a_limit_changed_directly_at_openrouter_is_put_back(broker: Broker, sandbox: Sandbox) -> None:
    info = await broker.provision("bob", limit="25")
    sandbox.state.update_key(info.key_id, KeyUpdate(set_limit=True, limit=Decimal("999")))
    report = await reconcile(broker)
    [mismatch] = findings(report, Kind.RECONCILE_FINDING_KIND_LIMIT_MISMATCH)
    assert mismatch.provider_usd == "999" and mismatch.broker_usd == "25" and mismatch.fixed
    assert sandbox_key(sandbox, info.key_id).limit == Decimal(25)
    assert sandbox_key(sandbox, info.key_id).limit_reset == "monthly"


async def test_spend_at_openrouter_without_record_usage_is_reported_as_drift(
    broker: Broker, sandbox: Sandbox
) -> None:
    await broker.provision("carol", limit="10")
    key = await broker.agent.GetKey(pb.GetKeyRequest(user_id="carol"), metadata=broker.as_agent())
    async with httpx.AsyncClient(timeout=5) as http:
        for _ in range(3):  # an agent that never reports its usage
            reply = await http.post(
                f"{sandbox.base_url}/chat/completions",
                json=CHAT,
                headers={"authorization": f"Bearer {key.api_key}"},
            )
            assert reply.status_code == 200
    spent = sandbox_key(sandbox, key.key_id).usage_in("monthly", sandbox.state.now())
    assert spent > 0
    broker.runtime.reconciler.drift_tolerance = Decimal(0)
    [drift] = findings(await reconcile(broker), Kind.RECONCILE_FINDING_KIND_SPEND_DRIFT)
    assert drift.user_id == "carol" and Decimal(drift.provider_usd) == spent and drift.broker_usd == "0"
    await broker.agent.RecordUsage(
        pb.RecordUsageRequest(user_id="carol", request_id="g-1", cost_usd=str(spent)),
        metadata=broker.as_agent(),
    )
    assert not findings(await reconcile(broker), Kind.RECONCILE_FINDING_KIND_SPEND_DRIFT), (
        "reported usage matches"
    )


async def test_a_key_deleted_or_disabled_at_openrouter_is_rotated(broker: Broker, sandbox: Sandbox) -> None:
    first = await broker.provision("dave")
    second = await broker.provision("erin")
    sandbox.state.delete_key(first.key_id)
    sandbox.state.update_key(second.key_id, KeyUpdate(disabled=True))
    report = await reconcile(broker)
    assert [f.user_id for f in findings(report, Kind.RECONCILE_FINDING_KIND_MISSING_KEY)] == ["dave"]
    assert [f.user_id for f in findings(report, Kind.RECONCILE_FINDING_KIND_DISABLED_AT_PROVIDER)] == ["erin"]
    for user in ("dave", "erin"):
        key = await broker.agent.GetKey(pb.GetKeyRequest(user_id=user), metadata=broker.as_agent())
        assert key.key_version == 2 and not sandbox_key(sandbox, key.key_id).disabled


async def test_a_new_month_restores_the_full_limit_on_a_key_rotated_mid_month(
    broker: Broker, sandbox: Sandbox, clock: TestClock
) -> None:
    clock.fixed = datetime(2026, 5, 20, tzinfo=UTC)
    await broker.provision("frank", limit="10")
    await broker.agent.RecordUsage(
        pb.RecordUsageRequest(user_id="frank", request_id="g-1", cost_usd="4"), metadata=broker.as_agent()
    )
    rotated = await broker.agent.RotateKey(
        pb.RotateKeyRequest(user_id="frank", request_id="r-1"), metadata=broker.as_agent()
    )
    assert sandbox_key(sandbox, rotated.key_id).limit == Decimal(6), "mid-month: what is left"
    clock.fixed = datetime(2026, 6, 1, 0, 0, 1, tzinfo=UTC)
    [restored] = findings(await reconcile(broker), Kind.RECONCILE_FINDING_KIND_LIMIT_MISMATCH)
    assert restored.broker_usd == "10" and restored.fixed
    assert sandbox_key(sandbox, rotated.key_id).limit == Decimal(10)
    assert not findings(await reconcile(broker), Kind.RECONCILE_FINDING_KIND_LIMIT_MISMATCH)


async def test_report_key_invalid_rotates_only_when_openrouter_confirms(
    broker: Broker, sandbox: Sandbox
) -> None:
    await broker.provision("gina")
    key = await broker.agent.GetKey(pb.GetKeyRequest(user_id="gina"), metadata=broker.as_agent())
    report = pb.ReportKeyInvalidRequest(user_id="gina", key_id=key.key_id, http_status=401)
    first = await broker.agent.ReportKeyInvalid(report, metadata=broker.as_agent())
    assert first.outcome == pb.KEY_REPORT_OUTCOME_KEY_VALID and first.key_version == 1, "a transient 401"
    again = await broker.agent.ReportKeyInvalid(report, metadata=broker.as_agent())
    assert again.outcome == pb.KEY_REPORT_OUTCOME_RATE_LIMITED

    broker.runtime.reports.min_interval = timedelta(0)
    sandbox.state.update_key(key.key_id, KeyUpdate(disabled=True))
    confirmed = await broker.agent.ReportKeyInvalid(report, metadata=broker.as_agent())
    assert confirmed.outcome == pb.KEY_REPORT_OUTCOME_ROTATED and confirmed.key_version == 2
    stale = await broker.agent.ReportKeyInvalid(report, metadata=broker.as_agent())
    assert stale.outcome == pb.KEY_REPORT_OUTCOME_STALE_KEY and stale.key_id == confirmed.key_id
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await broker.agent.ReportKeyInvalid(
            pb.ReportKeyInvalidRequest(user_id="nobody", key_id="x", http_status=401),
            metadata=broker.as_agent(),
        )
    assert_rpc_error(unknown.value, grpc.StatusCode.NOT_FOUND, "NO_API_KEY")


async def test_scheduled_rotation_rotates_old_keys_once_with_their_grace(
    broker: Broker, sandbox: Sandbox, clock: TestClock
) -> None:
    for user in ("old-1", "old-2"):
        await broker.provision(user)
    clock.offset = timedelta(days=31)
    await broker.provision("young")
    request = pb.RotateKeysRequest(
        older_than=duration_pb2.Duration(seconds=30 * 86400), grace_period=duration_pb2.Duration(seconds=600)
    )
    dry = await broker.admin.RotateKeys(
        pb.RotateKeysRequest(older_than=request.older_than, dry_run=True), metadata=broker.as_admin()
    )
    assert sorted(dry.rotated_user_ids) == ["old-1", "old-2"]
    done = await broker.admin.RotateKeys(request, metadata=broker.as_admin(), timeout=30)
    assert sorted(done.rotated_user_ids) == ["old-1", "old-2"] and not done.failures
    again = await broker.admin.RotateKeys(request, metadata=broker.as_admin(), timeout=30)
    assert not again.rotated_user_ids, "the new keys are young"
    old_key = await broker.runtime.keys.info("old-1")
    assert old_key.key_version == 2
    conn = await broker.db()
    try:
        retire_at = await conn.fetchval(
            "SELECT retire_at FROM api_keys WHERE user_id = 'old-1' AND key_version = 1"
        )
    finally:
        await conn.close()
    assert retire_at == old_key.rotate_time + timedelta(seconds=600)


async def test_each_background_task_runs_on_exactly_one_of_two_replicas(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    fast = {
        "background_interval": timedelta(milliseconds=50),
        "reconcile_interval": timedelta(milliseconds=200),
        "anomaly_interval": timedelta(milliseconds=200),
    }
    master = generate_master_key()
    async with (
        replica(database_url, sandbox, tmp_path / "a", master, **fast) as (_, first, _a),
        replica(database_url, sandbox, tmp_path / "b", master, **fast) as (_, second, _b),
    ):
        a, b = first.background, second.background
        assert a is not None and b is not None
        names = [task.name for task in a.tasks]
        assert {"retire-keys", "expire-reservations", "roll-back-intents", "reconcile"} <= set(names)

        async def every_task_ran_a_few_times() -> bool:
            return all(a.runs[n] + b.runs[n] >= 3 for n in names)

        await eventually(every_task_ran_a_few_times, timeout=20)
        for name in names:
            assert (a.runs[name] == 0) != (b.runs[name] == 0), (name, a.runs[name], b.runs[name])
        leader, follower = (a, b) if a.runs[names[0]] else (b, a)
        await leader.stop()  # the leader goes away and releases its leases
        before = {n: follower.runs[n] for n in names}

        async def follower_took_over() -> bool:
            return all(follower.runs[n] > before[n] for n in names)

        await eventually(follower_took_over, timeout=20)


async def test_the_old_key_works_during_the_grace_even_when_the_rotating_process_dies(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    clock = TestClock()
    master = generate_master_key()
    async with replica(database_url, sandbox, tmp_path / "a", master, clock) as (survivor, _, _channel):
        await survivor.keys.provision("hank", "free", None, "p-1", "test")
        old = await survivor.keys.get_key("hank", "test")
        async with replica(database_url, sandbox, tmp_path / "b", master, clock) as (doomed, _, _other):
            await doomed.keys.rotate("hank", "r-1", timedelta(seconds=60), False, "test")
        # The rotating replica is gone; the retirement is a database row that the survivor finishes.
        async with httpx.AsyncClient(timeout=5) as http:

            async def status() -> int:
                reply = await http.post(
                    f"{sandbox.base_url}/chat/completions",
                    json=CHAT,
                    headers={"authorization": f"Bearer {old.api_key}"},
                )
                return reply.status_code

            assert await status() == 200, "still inside the grace period"
            clock.offset = timedelta(seconds=61)

            async def refused() -> bool:
                return await status() == 401

            await eventually(refused, timeout=10)
        new = await survivor.keys.get_key("hank", "test")
        assert new.key_version == 2


async def test_reconcile_cli_prints_the_report_as_a_table(
    broker: Broker, sandbox: Sandbox, tmp_path: Path
) -> None:
    import os
    import sys

    await broker.provision("ivy")
    sandbox.state.create_key(NewKey(name="keybroker:ivy:v7"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYBROKER_", "OPENROUTER_"))}
    env.update(
        KEYBROKER_LISTEN=broker.target, KEYBROKER_TOKEN=broker.admin_token, KEYBROKER_DATA_DIR=str(tmp_path)
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "broker",
        "reconcile",
        "--dry-run",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    text = out.decode()
    assert "orphan_key" in text and "ivy" in text and "dry run" in text
