"""Key-encryption key rotation (issue 3 item 8): rows sealed under an old KEK keep opening while
the broker re-seals them online under the new one; afterwards the old KEK can go, and a missing
or wrong KEK is a clear startup error, never garbage."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import grpc
import pytest
from keybroker.v1 import keybroker_pb2 as pb

from broker import crypto, reseal
from broker.app import open_runtime, serving
from broker.config import ConfigError
from broker.db import Database
from broker.sandbox import Sandbox
from broker.storage import reseal_store
from tests.conftest import Broker, broker_settings

K1 = crypto.generate_master_key()
K2 = crypto.generate_master_key()
USERS = [f"kek-user-{n}" for n in range(7)]


@asynccontextmanager
async def running(
    database_url: str, sandbox: Sandbox, tmp_path: Path, master_key: str
) -> AsyncIterator[Broker]:
    """A broker on `database_url` with the given KEYBROKER_MASTER_KEY (a restart of the same service)."""
    settings = broker_settings(database_url, sandbox, tmp_path, master_key=master_key)
    async with open_runtime(settings) as runtime, serving(runtime) as server:
        suffix = secrets.token_hex(4)
        admin = await runtime.authority.create(f"admin-{suffix}", "admin", "test")
        agent = await runtime.authority.create(f"agent-{suffix}", "agent", "test")
        target = f"127.0.0.1:{server.port}"
        async with grpc.aio.insecure_channel(target) as channel:
            yield Broker(runtime, server, target, channel, admin.token, agent.token)


async def open_fails(database_url: str, sandbox: Sandbox, tmp_path: Path, master_key: str) -> str:
    settings = broker_settings(database_url, sandbox, tmp_path, master_key=master_key)
    with pytest.raises(ConfigError) as failure:
        async with open_runtime(settings):
            pass
    return str(failure.value)


async def get_key(broker: Broker, user_id: str) -> str:
    reply = await broker.agent.GetKey(
        pb.GetKeyRequest(user_id=user_id), metadata=broker.as_agent(), timeout=10
    )
    return str(reply.api_key)


async def kek_counts(database_url: str) -> dict[str, int]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT kek_id, count(*) AS n FROM api_keys GROUP BY kek_id")
    finally:
        await conn.close()
    return {row["kek_id"]: row["n"] for row in rows}


async def provision_under_old_kek(database_url: str, sandbox: Sandbox, tmp_path: Path) -> dict[str, str]:
    """Users provisioned (and one rotated, so a previous key row exists too) under `old` alone."""
    async with running(database_url, sandbox, tmp_path, f"old:{K1}") as old:
        for user_id in USERS:
            await old.provision(user_id)
        await old.agent.RotateKey(
            pb.RotateKeyRequest(user_id=USERS[0], request_id="rot-1"), metadata=old.as_agent(), timeout=10
        )
        return {user_id: await get_key(old, user_id) for user_id in USERS}


async def test_reseal_online_then_old_key_can_go_and_bad_keys_fail_at_startup(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    secrets_before = await provision_under_old_kek(database_url, sandbox, tmp_path)
    rows = len(USERS) + 1  # the rotated user has a previous key row
    assert await kek_counts(database_url) == {"old": rows}

    async with running(database_url, sandbox, tmp_path, f"old:{K1},new:{K2}") as both:
        # Rows sealed under the old KEK open before the reseal; new keys are sealed under the new one.
        assert {u: await get_key(both, u) for u in USERS} == secrets_before
        await both.provision("kek-late-user")
        assert await kek_counts(database_url) == {"old": rows, "new": 1}

        async def reads() -> list[str]:
            return [await get_key(both, u) for _ in range(5) for u in USERS]

        report, *read_rounds = await asyncio.gather(
            reseal.reseal_all(both.runtime.db, both.runtime.ring, "test-operator", batch_size=3),
            *(reads() for _ in range(4)),
        )
        for round_ in read_rounds:
            assert round_ == [secrets_before[u] for _ in range(5) for u in USERS]
        assert report.resealed == {"old": rows} and report.ok and report.batches == 3
        assert not report.changed_concurrently
        assert await kek_counts(database_url) == {"new": rows + 1}
        assert {u: await get_key(both, u) for u in USERS} == secrets_before

        conn = await both.db()
        try:
            audited = await conn.fetch(
                "SELECT actor, details FROM audit_log WHERE action = 'keys.resealed' ORDER BY seq"
            )
        finally:
            await conn.close()
        assert [row["actor"] for row in audited] == ["test-operator"] * 3
        assert sum(json.loads(row["details"])["resealed"]["old"] for row in audited) == rows

        again = await reseal.reseal_all(both.runtime.db, both.runtime.ring, "test-operator")
        assert again.total_resealed == 0 and again.batches == 0

    async with running(database_url, sandbox, tmp_path, f"new:{K2}") as new_only:
        assert {u: await get_key(new_only, u) for u in USERS} == secrets_before

    missing = await open_fails(database_url, sandbox, tmp_path, f"old:{K1}")
    assert "has no key with id 'new'" in missing and K1 not in missing and K2 not in missing
    wrong = await open_fails(database_url, sandbox, tmp_path, f"new:{K1}")
    assert "'new'" in wrong and "wrong key" in wrong and K1 not in wrong


async def test_missing_old_key_before_reseal_fails_at_startup_naming_it(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    await provision_under_old_kek(database_url, sandbox, tmp_path)
    message = await open_fails(database_url, sandbox, tmp_path, f"new:{K2}")
    assert "has no key with id 'old'" in message and f"but {len(USERS) + 1} stored" in message
    assert K2 not in message
    wrong = await open_fails(database_url, sandbox, tmp_path, f"old:{K2},new:{K1}")
    assert "'old'" in wrong and "wrong key" in wrong


async def test_a_row_changed_during_the_reseal_is_never_overwritten(
    database_url: str, sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets_before = await provision_under_old_kek(database_url, sandbox, tmp_path)
    async with running(database_url, sandbox, tmp_path, f"old:{K1},new:{K2}") as both:
        ring = both.runtime.ring
        read_batch = reseal_store.rows_to_reseal
        changed: dict[tuple[str, int], bytes] = {}

        async def read_then_change_one(
            db: Database, sealing_id: str, after: tuple[str, int], limit: int
        ) -> list[reseal_store.SealedRow]:
            batch = await read_batch(db, sealing_id, after, limit)
            if batch and not changed:  # another writer re-seals the first row after our read
                row = batch[0]
                identity = crypto.key_row_identity(row.user_id, row.key_version, row.key_id)
                old_only = crypto.KeyRing({"old": ring.keys["old"]}, "old")
                _, sealed = crypto.reseal(old_only, "old", row.sealed, identity)
                conn = await both.db()
                try:
                    await conn.execute(
                        "UPDATE api_keys SET sealed_secret = $3 WHERE user_id = $1 AND key_version = $2",
                        row.user_id,
                        row.key_version,
                        sealed,
                    )
                finally:
                    await conn.close()
                changed[(row.user_id, row.key_version)] = sealed
            return batch

        monkeypatch.setattr(reseal_store, "rows_to_reseal", read_then_change_one)
        report = await reseal.reseal_all(both.runtime.db, ring, "test", batch_size=4)
        assert report.changed_concurrently == {"old": 1}
        assert report.resealed == {"old": len(USERS)}
        conn = await both.db()
        try:
            ((user_id, version), sealed), *_ = changed.items()
            row = await conn.fetchrow(
                "SELECT kek_id, sealed_secret FROM api_keys WHERE user_id = $1 AND key_version = $2",
                user_id,
                version,
            )
        finally:
            await conn.close()
        assert (row["kek_id"], row["sealed_secret"]) == ("old", sealed)  # the other writer's bytes

        monkeypatch.undo()  # a second pass picks up what was skipped
        assert (await reseal.reseal_all(both.runtime.db, ring, "test")).resealed == {"old": 1}
        assert await kek_counts(database_url) == {"new": len(USERS) + 1}
        assert {u: await get_key(both, u) for u in USERS} == secrets_before


async def test_two_concurrent_reseals_write_each_row_once(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    secrets_before = await provision_under_old_kek(database_url, sandbox, tmp_path)
    async with running(database_url, sandbox, tmp_path, f"old:{K1},new:{K2}") as both:
        reports = await asyncio.gather(
            *(reseal.reseal_all(both.runtime.db, both.runtime.ring, f"op{n}", batch_size=1) for n in range(3))
        )
        assert sum(r.total_resealed for r in reports) == len(USERS) + 1
        assert await kek_counts(database_url) == {"new": len(USERS) + 1}
        assert {u: await get_key(both, u) for u in USERS} == secrets_before


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("old:not-base64!", "key 'old' is not valid base64"),
        ("old:" + "QUFBQQ==", "key 'old' must be 32 bytes"),
        ("old:{k},old:{k}", "'old' appears twice"),
        ("bad id!:{k}", "key ids are"),
        (" , ", "KEYBROKER_MASTER_KEY is empty"),
    ],
)
async def test_malformed_master_key_is_a_clear_config_error(
    spec: str, expected: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    # The key is parsed before anything connects, so no database is needed.
    message = await open_fails("postgresql://unused/none", sandbox, tmp_path, spec.format(k=K1))
    assert expected in message and K1 not in message


def cli(
    database_url: str, sandbox: Sandbox, tmp_path: Path, master_key: str, *argv: str
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYBROKER_", "OPENROUTER_"))}
    env.update(
        KEYBROKER_DATABASE_URL=database_url,
        KEYBROKER_MASTER_KEY=master_key,
        KEYBROKER_DATA_DIR=str(tmp_path),
        OPENROUTER_MANAGEMENT_KEY=sandbox.management_key,
        OPENROUTER_BASE_URL=str(sandbox.base_url),
    )
    return subprocess.run(
        [sys.executable, "-m", "broker", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


async def test_cli_keys_reseal_and_startup_errors(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    secrets_before = await provision_under_old_kek(database_url, sandbox, tmp_path)
    rows = len(USERS) + 1

    def run(master_key: str, *argv: str) -> asyncio.Future[subprocess.CompletedProcess[str]]:
        return asyncio.ensure_future(
            asyncio.to_thread(cli, database_url, sandbox, tmp_path, master_key, *argv)
        )

    missing, malformed = await asyncio.gather(run(f"new:{K2}", "keys", "reseal"), run("old:%%%", "migrate"))
    for failed, needle in ((missing, "'old'"), (malformed, "key 'old' is not valid base64")):
        assert failed.returncode == 1, failed.stderr
        assert needle in failed.stderr and "Traceback" not in failed.stderr
        assert failed.stderr.startswith("keybroker: error: KEYBROKER_MASTER_KEY")

    done = await run(f"old:{K1},new:{K2}", "keys", "reseal", "--batch-size", "5", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["resealed"] == {"old": rows}
    text = await run(f"old:{K1},new:{K2}", "keys", "reseal")
    assert text.returncode == 0, text.stderr
    assert "resealed 0 key(s) under 'new'" in text.stdout
    assert await kek_counts(database_url) == {"new": rows}
    async with running(database_url, sandbox, tmp_path, f"new:{K2}") as new_only:
        assert {u: await get_key(new_only, u) for u in USERS} == secrets_before
