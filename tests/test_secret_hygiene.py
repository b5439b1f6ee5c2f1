"""Secrets stay secret: no OpenRouter key, caller token, master key or management key in any table,
log record or error; and a sealed secret copied to another row does not open."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
from collections.abc import Iterable
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import duration_pb2
from keybroker.v1 import keybroker_pb2 as pb

from broker.sandbox import Fault, Sandbox
from tests.conftest import Broker
from tests.helpers import assert_never_unknown_or_internal, assert_rpc_error, rich_status


def render(value: Any) -> Iterable[str]:
    """Every text form a stored value could leak a secret in."""
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        yield raw.hex()
        yield raw.decode("latin-1")
    else:
        yield str(value)


async def dump_database(conn: asyncpg.Connection) -> tuple[str, list[bytes]]:
    """All rows of every table in the public schema, as Python and as PostgreSQL render them,
    plus the raw bytes of every bytea value."""
    tables = [
        r["tablename"]
        for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    ]
    assert {"users", "api_keys", "audit_log", "caller_tokens", "usage_ledger"} <= set(tables)
    texts: list[str] = []
    raw: list[bytes] = []
    for table in tables:
        for row in await conn.fetch(f'SELECT * FROM "{table}"'):  # noqa: S608 - names from pg_tables
            for value in row.values():
                texts.extend(render(value))
                if isinstance(value, bytes):
                    raw.append(value)
        texts.extend(r["t"] for r in await conn.fetch(f'SELECT t::text AS t FROM "{table}" t'))  # noqa: S608
    return "\n".join(texts), raw


def log_text(caplog: pytest.LogCaptureFixture) -> str:
    """Every captured record of set-up and call: message, arguments, extras, exception text."""
    records = [*caplog.get_records("setup"), *caplog.get_records("call")]
    assert records, "logging was captured"
    parts: list[str] = []
    for record in records:
        parts.append(record.getMessage())
        parts.extend(str(value) for value in record.__dict__.values())
        if record.exc_info:
            parts.append(logging.Formatter().formatException(record.exc_info))
    return "\n".join(parts)


def error_text(error: grpc.aio.AioRpcError) -> str:
    """What a caller sees of an error: message, trailing metadata and every rich detail."""
    parts = [error.details() or "", str(error.debug_error_string())]
    parts.extend(f"{key}={value!r}" for key, value in error.trailing_metadata() or ())
    try:
        parts.append(str(rich_status(error)))
    except AssertionError:
        pass
    return "\n".join(parts)


def forbidden(broker: Broker, sandbox: Sandbox) -> dict[str, str]:
    """Every secret by a name for the failure message."""
    found = {}
    for key in sandbox.state.all_keys():
        found[f"openrouter key {key.name}"] = key.secret
        found[f"openrouter key body {key.name}"] = key.secret.removeprefix("sk-or-v1-")
    for name, token in (("admin", broker.admin_token), ("agent", broker.agent_token)):
        found[f"{name} token"] = token
        found[f"{name} token secret"] = token.split("_", 2)[2]
    master_key = broker.runtime.settings.master_key
    assert master_key
    found["master key"] = master_key
    found["management key"] = sandbox.management_key
    return found


def leaks(text: str, secrets: dict[str, str]) -> list[str]:
    return [name for name, secret in secrets.items() if secret in text]


async def test_no_secret_reaches_the_database_the_logs_or_an_error(
    captured_logs: pytest.LogCaptureFixture, broker: Broker, sandbox: Sandbox
) -> None:
    await asyncio.gather(
        broker.provision("alice"),
        broker.provision("bob", tier="standard"),
        broker.provision("carol", tier="admin"),
        broker.provision("dave", limit="5"),
    )
    await broker.agent.RotateKey(
        pb.RotateKeyRequest(user_id="alice", request_id="r-1"), metadata=broker.as_agent()
    )
    await broker.agent.RotateKey(
        pb.RotateKeyRequest(
            user_id="bob", request_id="r-1", grace_period=duration_pb2.Duration(seconds=3600)
        ),
        metadata=broker.as_agent(),
    )
    disclosed = await asyncio.gather(
        *(
            broker.agent.GetKey(pb.GetKeyRequest(user_id=u), metadata=broker.as_agent())
            for u in ("alice", "bob", "carol", "dave")
        )
    )
    check = await broker.agent.CheckLimit(
        pb.CheckLimitRequest(user_id="dave", estimated_cost_usd="0.5", request_id="c-1"),
        metadata=broker.as_agent(),
    )
    await broker.agent.RecordUsage(
        pb.RecordUsageRequest(
            user_id="dave", request_id="gen-1", cost_usd="0.2", reservation_id=check.reservation_id
        ),
        metadata=broker.as_agent(),
    )
    await broker.admin.RevokeKey(pb.RevokeKeyRequest(user_id="carol"), metadata=broker.as_admin())

    secrets = forbidden(broker, sandbox)
    issued = {key.secret for key in sandbox.state.all_keys()}
    assert len(issued) == 6 and {d.api_key for d in disclosed} <= issued

    # Failed calls, some of them holding a secret in the request or in the provider's answer.
    alice_key = disclosed[0].api_key
    sandbox.faults.add(
        Fault(path_prefix="/api/v1/keys/", status=500, times=3, retry_after="0",
              message=f"upstream said {sandbox.management_key} {alice_key}")
    )  # fmt: skip
    failing = [
        broker.admin.UpdateKey(pb.UpdateKeyRequest(user_id="alice", tier="beta"), metadata=broker.as_admin()),
        broker.agent.GetKey(pb.GetKeyRequest(user_id="ghost"), metadata=broker.as_agent()),
        broker.agent.GetKey(pb.GetKeyRequest(user_id="carol"), metadata=broker.as_agent()),
        broker.agent.GetKey(
            pb.GetKeyRequest(user_id="alice"), metadata=(("authorization", f"Bearer {broker.agent_token}x"),)
        ),
        broker.agent.GetKey(pb.GetKeyRequest(user_id="alice"), metadata=(("authorization", alice_key),)),
        broker.agent.RecordUsage(
            pb.RecordUsageRequest(user_id="alice", request_id=alice_key, cost_usd=alice_key),
            metadata=broker.as_agent(),
        ),
        broker.agent.RecordUsage(
            pb.RecordUsageRequest(user_id="alice", request_id="g-2", cost_usd="1", model=f"{alice_key}\x00"),
            metadata=broker.as_agent(),
        ),
        broker.admin.ProvisionKey(
            pb.ProvisionKeyRequest(user_id="alice", request_id="again"), metadata=broker.as_admin()
        ),
    ]
    errors = await asyncio.gather(*failing, return_exceptions=True)
    assert all(isinstance(e, grpc.aio.AioRpcError) for e in errors), errors
    for error in errors:
        assert isinstance(error, grpc.aio.AioRpcError)
        assert_never_unknown_or_internal(error)
        assert leaks(error_text(error), secrets) == [], (error.code(), error.details())
    assert isinstance(errors[0], grpc.aio.AioRpcError)
    assert_rpc_error(errors[0], grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE")

    conn = await broker.db()
    try:
        stored, raw_values = await dump_database(conn)
    finally:
        await conn.close()
    assert leaks(stored, secrets) == []
    master = base64.b64decode(secrets["master key"])
    assert not [raw for raw in raw_values if master in raw], "the raw master key is not stored"
    assert not [raw for raw in raw_values for s in issued if s.encode() in raw]
    for token in (broker.admin_token, broker.agent_token):
        assert hashlib.sha256(token.encode()).hexdigest() in stored, "bytea values are in the dump"
    assert all(d.key_id in stored for d in disclosed), "the dump does hold the (public) key ids"

    logged = log_text(captured_logs)
    assert "keybroker" in logged, "the broker's own records were captured"
    assert leaks(logged, secrets) == []


async def test_a_sealed_secret_copied_to_another_row_does_not_open(
    captured_logs: pytest.LogCaptureFixture, broker: Broker
) -> None:
    await asyncio.gather(broker.provision("alice"), broker.provision("bob"))
    alice = await broker.agent.GetKey(pb.GetKeyRequest(user_id="alice"), metadata=broker.as_agent())
    conn = await broker.db()
    try:
        copied = await conn.execute(
            """UPDATE api_keys b SET sealed_secret = a.sealed_secret, kek_id = a.kek_id
               FROM api_keys a
               WHERE a.user_id = 'alice' AND a.key_version = 1 AND b.user_id = 'bob' AND b.key_version = 1"""
        )
        assert copied == "UPDATE 1"
    finally:
        await conn.close()

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await broker.agent.GetKey(pb.GetKeyRequest(user_id="bob"), metadata=broker.as_agent())
    error = refused.value
    # A deployment fault that a retry cannot fix: FAILED_PRECONDITION with reason KEY_UNREADABLE.
    assert_rpc_error(error, grpc.StatusCode.FAILED_PRECONDITION, "KEY_UNREADABLE")
    assert alice.api_key not in error_text(error)
    assert alice.api_key not in log_text(captured_logs)

    again = await broker.agent.GetKey(pb.GetKeyRequest(user_id="alice"), metadata=broker.as_agent())
    assert again.api_key == alice.api_key, "the original row still opens"


async def test_a_sealed_secret_copied_to_another_version_of_the_same_user_does_not_open(
    broker: Broker,
) -> None:
    await broker.provision("alice")
    first = await broker.agent.GetKey(pb.GetKeyRequest(user_id="alice"), metadata=broker.as_agent())
    await broker.agent.RotateKey(
        pb.RotateKeyRequest(user_id="alice", request_id="r-1"), metadata=broker.as_agent()
    )
    conn = await broker.db()
    try:
        await conn.execute(
            """UPDATE api_keys SET sealed_secret = (SELECT sealed_secret FROM api_keys
                                                    WHERE user_id = 'alice' AND key_version = 1)
               WHERE user_id = 'alice' AND key_version = 2"""
        )
    finally:
        await conn.close()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await broker.agent.GetKey(pb.GetKeyRequest(user_id="alice"), metadata=broker.as_agent())
    assert_rpc_error(refused.value, grpc.StatusCode.FAILED_PRECONDITION, "KEY_UNREADABLE")
    assert first.api_key not in error_text(refused.value)
