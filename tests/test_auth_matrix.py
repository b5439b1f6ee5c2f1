"""The authorization matrix (issue 5, item 6): every RPC of both services, WatchKeys included, ×
{no token, malformed header, unknown token, revoked token, forged secret, wrong scope, right scope}.

Refused callers get UNAUTHENTICATED or PERMISSION_DENIED with an ErrorInfo reason and change
nothing; the right scope is never refused; admin reaches everything; health and reflection need no
token. Tokens are stored only as hashes and compared in constant time.
"""

from __future__ import annotations

import hashlib
import inspect
import re
import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor, duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from keybroker.v1 import keybroker_pb2 as pb

import broker.auth
from broker.auth import TokenAuthority, required_scopes
from broker.sandbox import Sandbox
from tests.conftest import Broker
from tests.helpers import (
    assert_rpc_error,
    fresh_database,
    running_broker,
    stream_outcome,
    table_counts,
    written_tables,
)

SERVICES = (pb.DESCRIPTOR.services_by_name["KeyBroker"], pb.DESCRIPTOR.services_by_name["KeyBrokerAdmin"])
METHODS = [method for service in SERVICES for method in service.methods]
USER = "auth-user"
REVOKEE = "auth-revokee"
RESERVATION = "0b7f1e8e-1d5c-4a8e-9c39-5d8c2f1b3a10"
# A well-formed request for every field name the contract uses; unknown fields keep their default.
FIELD_VALUES: dict[str, Any] = {
    "user_id": USER,
    "user_ids": [USER],
    "request_id": "auth-request-1",
    "reservation_id": RESERVATION,
    "estimated_cost_usd": "0.01",
    "cost_usd": "0.01",
    "model": "openai/gpt-4o",
    "agent": "planner",
    "prompt_tokens": 10,
    "completion_tokens": 5,
    "key_id": "0" * 64,
    "http_status": 401,
    "tier": "standard",
    "dry_run": True,
    "page_size": 10,
}


def request_for(method: descriptor.MethodDescriptor) -> Any:
    request = getattr(pb, method.input_type.name)()
    for field in method.input_type.fields:
        if field.name in FIELD_VALUES:
            value = FIELD_VALUES[field.name]
            if field.is_repeated:
                getattr(request, field.name).extend(value)
            else:
                setattr(request, field.name, value)
        elif field.message_type is not None and field.message_type.full_name == "google.protobuf.Duration":
            getattr(request, field.name).CopyFrom(duration_pb2.Duration(seconds=0))
    if method.name == "RevokeKey":
        request.user_id = REVOKEE  # keep USER's key for the other RPCs
    return request


@dataclass
class Matrix:
    broker: Broker
    headers: dict[str, str | None]

    async def call(self, method: descriptor.MethodDescriptor, authorization: str | None) -> grpc.StatusCode:
        """The RPC's outcome with this `authorization` header (None: no header at all); asserts that
        a refused call carries the matching ErrorInfo."""
        metadata = () if authorization is None else (("authorization", authorization),)
        path = f"/{method.containing_service.full_name}/{method.name}"
        request = request_for(method)
        output = getattr(pb, method.output_type.name)
        channel = self.broker.channel
        error: grpc.aio.AioRpcError | None
        if method.server_streaming:
            stream = channel.unary_stream(
                path,
                request_serializer=type(request).SerializeToString,
                response_deserializer=output.FromString,
            )
            error = await stream_outcome(stream(request, metadata=metadata, timeout=60))
        else:
            unary = channel.unary_unary(
                path,
                request_serializer=type(request).SerializeToString,
                response_deserializer=output.FromString,
            )
            try:
                await unary(request, metadata=metadata, timeout=60)
                error = None
            except grpc.aio.AioRpcError as raised:
                error = raised
        if error is None:
            return grpc.StatusCode.OK
        if error.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            assert_rpc_error(error, error.code(), error.code().name)
        return error.code()


@pytest.fixture(scope="module")
async def matrix(
    pg_admin_url: str, template_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Matrix]:
    sandbox = Sandbox("sandbox-management-" + secrets.token_hex(8))
    await sandbox.start("127.0.0.1", 0)
    try:
        async with (
            fresh_database(pg_admin_url) as url,
            running_broker(
                url, sandbox, tmp_path_factory.mktemp("auth"), background_interval=timedelta(hours=1)
            ) as broker,
        ):
            await broker.provision(USER, tier="beta")
            await broker.provision(REVOKEE)
            authority = broker.runtime.authority
            revoked = await authority.create("auth-revoked", "admin", "test")
            assert await authority.revoke("auth-revoked", "test")
            admin_id = broker.admin_token.split("_")[1]
            headers: dict[str, str | None] = {
                "no header": None,
                "empty header": "",
                "Basic scheme": "Basic x",
                "Bearer without a token": "Bearer",
                "Bearer with a non-token": "Bearer notatoken",
                "unknown token": f"Bearer kbt_{secrets.token_hex(8)}_{secrets.token_urlsafe(32)}",
                "forged secret of a live admin token": f"Bearer kbt_{admin_id}_{secrets.token_urlsafe(32)}",
                "revoked admin token": f"Bearer {revoked.token}",
                "agent token": f"Bearer {broker.agent_token}",
                "admin token": f"Bearer {broker.admin_token}",
            }
            yield Matrix(broker, headers)
    finally:
        await sandbox.stop()


UNAUTHENTICATED_HEADERS = (
    "no header",
    "empty header",
    "Basic scheme",
    "Bearer without a token",
    "Bearer with a non-token",
    "unknown token",
    "forged secret of a live admin token",
    "revoked admin token",
)
CASES = [
    pytest.param(method.name, header, id=f"{method.name}-{header.replace(' ', '_')}")
    for method in METHODS
    for header in (*UNAUTHENTICATED_HEADERS, "agent token", "admin token")
]
METHOD_BY_NAME = {method.name: method for method in METHODS}


def expected(method: descriptor.MethodDescriptor, header: str) -> grpc.StatusCode | None:
    """The code the matrix demands; None: anything but a refusal."""
    if header in UNAUTHENTICATED_HEADERS:
        return grpc.StatusCode.UNAUTHENTICATED
    if header == "agent token" and method.containing_service.name == "KeyBrokerAdmin":
        return grpc.StatusCode.PERMISSION_DENIED
    return None


@pytest.mark.parametrize(("rpc", "header"), CASES)
async def test_authorization_matrix(matrix: Matrix, rpc: str, header: str) -> None:
    method = METHOD_BY_NAME[rpc]
    want = expected(method, header)
    conn = await matrix.broker.db()
    try:
        tables = await written_tables(conn)
        before = await table_counts(conn, tables)
        got = await matrix.call(method, matrix.headers[header])
        if want is None:
            assert got not in (
                grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.PERMISSION_DENIED,
                grpc.StatusCode.UNKNOWN,
                grpc.StatusCode.INTERNAL,
            ), (rpc, header, got)
        else:
            assert got == want, (rpc, header, got)
            assert await table_counts(conn, tables) == before, "a refused caller changed nothing"
    finally:
        await conn.close()


def test_the_matrix_covers_every_rpc_and_admin_reaches_every_service() -> None:
    assert {case.values[0] for case in CASES} == {
        m.name for s in pb.DESCRIPTOR.services_by_name.values() for m in s.methods
    }
    for method in METHODS:
        scopes = required_scopes(f"/{method.containing_service.full_name}/{method.name}")
        assert scopes is not None and "admin" in scopes, method.name
        assert ("agent" in scopes) == (method.containing_service.name == "KeyBroker"), method.name
    assert required_scopes("/keybroker.v1.SomethingNew/Call") == ("admin",), "unknown services are admin-only"


async def test_health_and_reflection_need_no_token(matrix: Matrix) -> None:
    channel = matrix.broker.channel
    health = health_pb2_grpc.HealthStub(channel)
    for metadata in ((), (("authorization", "Bearer notatoken"),)):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""), metadata=metadata, timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        for service in SERVICES:
            reply = await health.Check(
                health_pb2.HealthCheckRequest(service=service.full_name), metadata=metadata, timeout=10
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        yield reflection_pb2.ServerReflectionRequest(file_containing_symbol="keybroker.v1.KeyBroker")

    answers = [answer async for answer in reflection.ServerReflectionInfo(ask(), timeout=10)]
    listed = {service.name for service in answers[0].list_services_response.service}
    assert {service.full_name for service in SERVICES} <= listed
    assert answers[1].file_descriptor_response.file_descriptor_proto, "the proto is served without a token"


async def test_health_watch_needs_no_token(matrix: Matrix) -> None:
    health = health_pb2_grpc.HealthStub(matrix.broker.channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
    try:
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        watch.cancel()


async def test_tokens_are_stored_only_as_hashes(matrix: Matrix) -> None:
    issued = await matrix.broker.runtime.authority.create(f"hash-{uuid.uuid4().hex[:8]}", "agent", "test")
    secret_part = issued.token.split("_", 2)[2]
    conn = await matrix.broker.db()
    try:
        rows = await conn.fetch("SELECT t::text AS row_text, t.secret_hash FROM caller_tokens t")
        tables = await conn.fetch(
            """SELECT quote_ident(table_name) AS name FROM information_schema.tables
               WHERE table_schema = 'public'"""
        )
        dumps = []
        for table in tables:  # a dump of every table, as text (names come from the catalogue)
            query = f"SELECT coalesce(string_agg(t::text, E'\\n'), '') FROM {table['name']} t"  # noqa: S608
            dumps.append(await conn.fetchval(query))
        dump = "\n".join(dumps)
    finally:
        await conn.close()
    tokens = (issued.token, matrix.broker.admin_token, matrix.broker.agent_token)
    for token in tokens:
        secret = token.split("_", 2)[2]
        assert secret not in dump, "no table holds a token's secret"
        assert secret.encode().hex() not in dump, "nor its bytes"
        for row in rows:
            assert bytes(row["secret_hash"]) != token.encode()
    hashes = {bytes(row["secret_hash"]) for row in rows}
    assert hashlib.sha256(issued.token.encode()).digest() in hashes, (
        "the stored value is SHA-256 of the token"
    )
    assert secret_part not in "\n".join(row["row_text"] for row in rows)


def test_token_comparison_uses_a_constant_time_compare() -> None:
    """Static check: the secret hash is compared with hmac.compare_digest, never with == or !=."""
    source = inspect.getsource(TokenAuthority.authenticate)
    assert "hmac.compare_digest(" in source
    assert not re.search(r"secret_hash[^\n]*(==|!=)|(==|!=)[^\n]*secret_hash", source)
    module = inspect.getsource(broker.auth)
    assert not re.search(r"\.secret_hash\s*(==|!=)", module)


async def test_compare_digest_runs_for_known_unknown_and_forged_tokens(
    matrix: Matrix, monkeypatch: pytest.MonkeyPatch
) -> None:
    """And at run time: every well-formed token goes through compare_digest, also for an id that does
    not exist (so timing does not tell which ids exist)."""
    import hmac

    calls: list[tuple[bytes, bytes]] = []

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return hmac.compare_digest(a, b)

    monkeypatch.setattr(broker.auth, "hmac", SimpleNamespace(compare_digest=spy))
    method = METHOD_BY_NAME["GetKeyInfo"]
    for header, want in (
        ("admin token", grpc.StatusCode.OK),
        ("unknown token", grpc.StatusCode.UNAUTHENTICATED),
        ("forged secret of a live admin token", grpc.StatusCode.UNAUTHENTICATED),
        ("revoked admin token", grpc.StatusCode.UNAUTHENTICATED),
    ):
        before = len(calls)
        assert await matrix.call(method, matrix.headers[header]) == want, header
        assert len(calls) == before + 1, f"compare_digest ran once for the {header}"
        assert all(len(side) == 32 for side in calls[-1]), "equal-length digests are compared"
