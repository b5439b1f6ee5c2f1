"""Tamper-evident audit (issue 3 item 9): per-user hash chains that verify after real operations,
and every kind of tampering named at its first broken row; `audit verify` and `audit list`."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from google.protobuf.duration_pb2 import Duration
from keybroker.v1 import keybroker_pb2 as pb

from broker import audit, crypto, reseal
from broker.cli_ops import parse_since
from tests.conftest import Broker

AUDITED_ACTIONS = {
    "token.created",
    "token.revoked",
    "key.provisioned",
    "key.disclosed",
    "key.rotated",
    "key.retired",
    "key.revoked",
    "key.updated",
    "keys.resealed",
}


async def make_history(broker: Broker) -> None:
    """A mix of every audited operation, through the public API where there is one."""
    await broker.provision("alice")
    await broker.provision("bob", limit="20")
    for _ in range(2):
        await broker.agent.GetKey(pb.GetKeyRequest(user_id="alice"), metadata=broker.as_agent(), timeout=10)
    await broker.admin.UpdateKey(
        pb.UpdateKeyRequest(user_id="alice", tier="standard"), metadata=broker.as_admin(), timeout=10
    )
    await broker.admin.UpdateKey(
        pb.UpdateKeyRequest(user_id="bob", monthly_limit_usd="35"), metadata=broker.as_admin(), timeout=10
    )
    await broker.agent.RotateKey(
        pb.RotateKeyRequest(user_id="alice", request_id="r1", grace_period=Duration(seconds=0)),
        metadata=broker.as_agent(),
        timeout=10,
    )
    await broker.admin.RevokeKey(pb.RevokeKeyRequest(user_id="bob"), metadata=broker.as_admin(), timeout=10)
    await broker.runtime.authority.create("ci-bot", "agent", "cli:ops")
    await broker.runtime.authority.revoke("ci-bot", "cli:ops")
    # Re-seal under a second KEK (the serving broker's ring has only the first, so do this last).
    ring = broker.runtime.ring
    both = crypto.KeyRing(
        {**ring.keys, "k2": crypto.parse_master_key(crypto.generate_master_key()).keys["k1"]}, "k2"
    )
    assert (await reseal.reseal_all(broker.runtime.db, both, "cli:ops")).total_resealed == 3


async def verify_both_ways(broker: Broker) -> audit.VerifyResult:
    """verify_chain in one batch and in tiny batches (every batching path) must agree."""
    result = await audit.verify_chain(broker.runtime.db)
    small = await audit.verify_chain(broker.runtime.db, batch_size=2)
    assert small == result if result.ok else small.broken == result.broken
    return result


async def test_chain_verifies_after_every_audited_action(broker: Broker) -> None:
    await make_history(broker)
    conn = await broker.db()
    try:
        actions = {row["action"] for row in await conn.fetch("SELECT DISTINCT action FROM audit_log")}
        updates = [
            json.loads(row["details"])
            for row in await conn.fetch("SELECT details FROM audit_log WHERE action = 'key.updated'")
        ]
        disclosures = await conn.fetchval(
            "SELECT count(*) FROM audit_log WHERE action = 'key.disclosed' AND user_id = 'alice'"
        )
        rows = await conn.fetchval("SELECT count(*) FROM audit_log")
        chains = await conn.fetchval("SELECT count(DISTINCT user_id) FROM audit_log")
    finally:
        await conn.close()
    assert AUDITED_ACTIONS <= actions, AUDITED_ACTIONS - actions
    assert disclosures == 2
    assert {u["tier"] for u in updates} == {"standard", None}  # a tier change and a limit change
    assert {u["custom_limit_usd"] for u in updates} == {None, "35"}
    result = await verify_both_ways(broker)
    assert result == audit.VerifyResult(rows=rows, chains=chains, broken=None) and result.ok
    assert chains == 3  # '' (tokens, reseals), alice, bob


async def test_empty_log_verifies(broker: Broker) -> None:
    conn = await broker.db()
    try:
        await conn.execute("DELETE FROM audit_log; DELETE FROM audit_heads")
    finally:
        await conn.close()
    assert await verify_both_ways(broker) == audit.VerifyResult(0, 0)


_APPEND = """INSERT INTO audit_log (user_id, event_id, event_time, actor, action, details, seq,
                                    prev_hash, row_hash)
    SELECT user_id, gen_random_uuid(), event_time, actor, action, details, seq + 1, row_hash, {hash}
    FROM audit_log WHERE user_id = 'alice' ORDER BY seq DESC LIMIT 1"""

# name: (SQL, first broken row as (user_id, seq or "last" / "last+1" / "token.revoked"), problem)
TAMPERING: dict[str, tuple[str, tuple[str, int | str], str]] = {
    "details edited": (
        """UPDATE audit_log SET details = details || '{"tier": "enterprise"}'
           WHERE user_id = 'alice' AND seq = 3""",
        ("alice", 3),
        "row_hash does not match",
    ),
    "event_time moved by a microsecond": (
        """UPDATE audit_log SET event_time = event_time + interval '1 microsecond'
           WHERE user_id = 'alice' AND seq = 2""",
        ("alice", 2),
        "row_hash does not match",
    ),
    "actor edited": (
        "UPDATE audit_log SET actor = 'someone-else' WHERE user_id = 'alice' AND seq = 1",
        ("alice", 1),
        "row_hash does not match",
    ),
    "middle row deleted": (
        "DELETE FROM audit_log WHERE user_id = 'alice' AND seq = 2",
        ("alice", 2),
        "row is missing (the next row has seq 3)",
    ),
    "row_hash rewritten": (
        "UPDATE audit_log SET row_hash = sha256(row_hash) WHERE user_id = 'alice' AND seq = 2",
        ("alice", 2),
        "row_hash does not match",
    ),
    "edited and rehashed": (
        """UPDATE audit_log SET actor = 'forger', row_hash = sha256(
               prev_hash || kb_audit_content(user_id, seq, event_time, 'forger', action, details))
           WHERE user_id = 'alice' AND seq = 2""",
        ("alice", 3),
        "prev_hash is not the row_hash of seq 2",
    ),
    "last row deleted": (
        """DELETE FROM audit_log WHERE user_id = 'alice'
           AND seq = (SELECT max(seq) FROM audit_log WHERE user_id = 'alice')""",
        ("alice", "last"),
        "row is missing (audit_heads says the chain ends at seq",
    ),
    "head rewritten": (
        "UPDATE audit_heads SET row_hash = sha256(row_hash) WHERE user_id = 'alice'",
        ("alice", "last"),
        "differs from the one in audit_heads",
    ),
    "row appended with a bad hash": (
        _APPEND.format(hash="row_hash"),
        ("alice", "last+1"),
        "row_hash does not match",
    ),
    "row appended past the head and hashed": (
        _APPEND.format(
            hash="sha256(row_hash || kb_audit_content(user_id, seq + 1, event_time, actor, action, details))"
        ),
        ("alice", "last+1"),
        "row is past the chain's end in audit_heads",
    ),
    "whole chain deleted": ("DELETE FROM audit_log WHERE user_id = 'bob'", ("bob", 1), "row is missing"),
    "chain of no user edited": (
        "UPDATE audit_log SET details = '{}' WHERE user_id = '' AND action = 'token.revoked'",
        ("", "token.revoked"),
        "row_hash does not match",
    ),
    "several rows edited: the first is named": (
        "UPDATE audit_log SET actor = 'x' WHERE (user_id = 'alice' AND seq IN (2, 4)) OR user_id = 'bob'",
        ("alice", 2),
        "row_hash does not match",
    ),
}


@pytest.mark.parametrize("name", TAMPERING)
async def test_tampering_is_detected_at_the_first_broken_row(broker: Broker, name: str) -> None:
    await make_history(broker)
    sql, (user_id, seq), problem = TAMPERING[name]
    conn = await broker.db()
    try:
        last = await conn.fetchval("SELECT max(seq) FROM audit_log WHERE user_id = $1", user_id)
        named = {
            "last": last,
            "last+1": last + 1,
            "token.revoked": await conn.fetchval(
                "SELECT seq FROM audit_log WHERE user_id = '' AND action = 'token.revoked'"
            ),
        }
        await conn.execute(sql)
    finally:
        await conn.close()
    expected_seq = named[seq] if isinstance(seq, str) else seq
    result = await verify_both_ways(broker)
    assert not result.ok and result.broken is not None
    assert (result.broken.user_id, result.broken.seq) == (user_id, expected_seq), result.broken
    assert problem in result.broken.problem, result.broken


def cli(broker: Broker, tmp_path: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    settings = broker.runtime.settings
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYBROKER_", "OPENROUTER_"))}
    env.update(
        KEYBROKER_DATABASE_URL=str(settings.database_url),
        KEYBROKER_MASTER_KEY=str(settings.master_key),
        KEYBROKER_DATA_DIR=str(tmp_path),
        OPENROUTER_MANAGEMENT_KEY=str(settings.management_key),
        OPENROUTER_BASE_URL=settings.openrouter_base_url,
    )
    return subprocess.run(
        [sys.executable, "-m", "broker", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


async def test_cli_audit_verify_and_list(broker: Broker, tmp_path: Path) -> None:
    await broker.provision("alice")
    await broker.provision("bob")
    await broker.agent.GetKey(pb.GetKeyRequest(user_id="alice"), metadata=broker.as_agent(), timeout=10)
    expected = await audit.verify_chain(broker.runtime.db)
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()

    def run(*argv: str) -> Awaitable[subprocess.CompletedProcess[str]]:
        return asyncio.to_thread(cli, broker, tmp_path, *argv)

    intact, recent, future, everyone, bad_since = await asyncio.gather(
        run("audit", "verify"),
        run("audit", "list", "--user", "alice", "--since", "1h", "--json"),
        run("audit", "list", "--user", "alice", "--since", tomorrow, "--json"),
        run("audit", "list", "--since", "2000-01-01T00:00:00", "--limit", "100", "--json"),
        run("audit", "list", "--since", "yesterday-ish"),
    )
    assert intact.returncode == 0, intact.stderr
    assert intact.stdout.strip() == f"audit chain intact: {expected.rows} rows, {expected.chains} chains"
    assert recent.returncode == 0, recent.stderr
    listed = json.loads(recent.stdout)
    assert {row["action"] for row in listed} == {"key.provisioned", "key.disclosed"}
    assert {row["user_id"] for row in listed} == {"alice"}
    assert json.loads(future.stdout) == []
    assert {row["user_id"] for row in json.loads(everyone.stdout)} == {"", "alice", "bob"}
    assert bad_since.returncode == 2 and "not a date, datetime or duration" in bad_since.stderr

    conn = await broker.db()
    try:
        await conn.execute("UPDATE audit_log SET details = '{}' WHERE user_id = 'bob' AND seq = 1")
    finally:
        await conn.close()
    broken = await run("audit", "verify")
    assert broken.returncode == 1
    assert "user 'bob' seq 1" in broken.stdout and "row_hash does not match" in broken.stdout


def test_since_accepts_dates_datetimes_and_durations() -> None:
    assert parse_since("2025-01-31") == datetime(2025, 1, 31, tzinfo=UTC)
    assert parse_since("2025-01-31T12:30:00+02:00") == datetime(2025, 1, 31, 10, 30, tzinfo=UTC)
    assert parse_since("2025-01-31T12:30Z") == datetime(2025, 1, 31, 12, 30, tzinfo=UTC)
    before = datetime.now(UTC)
    assert abs(parse_since("24h") - (before - timedelta(hours=24))) < timedelta(seconds=5)
    assert abs(parse_since("7d") - (before - timedelta(days=7))) < timedelta(seconds=5)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_since("last tuesday")
