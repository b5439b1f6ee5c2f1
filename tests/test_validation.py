"""Malformed requests through the real server: INVALID_ARGUMENT with a BadRequest naming the field,
and nothing written (no row in any table, no key at the provider)."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import duration_pb2
from keybroker.v1 import keybroker_pb2 as pb

from broker.app import open_runtime, serving
from broker.sandbox import Sandbox
from tests.conftest import TEMPLATE, Broker, TestClock, broker_settings, url_for_database
from tests.helpers import BROKER_TABLES, assert_invalid_argument

USER = "alice"
RESERVATION = "0b7f1e8e-1d5c-4a8e-9c39-5d8c2f1b3a10"
DAY = 24 * 3600

# Written by the background tasks on their own schedule, not by RPCs.
BACKGROUND_TABLES = {"leases"}

AGENT_RPCS = {"GetKey", "CheckLimit", "RecordUsage", "ReleaseReservation", "RotateKey"}


@dataclass(frozen=True)
class Case:
    rpc: str
    request: Any
    field: str

    def __str__(self) -> str:
        return f"{self.rpc}:{self.field}"


def usage(**change: Any) -> pb.RecordUsageRequest:
    fields: dict[str, Any] = {
        "user_id": USER, "request_id": "gen-1", "cost_usd": "0.01", "model": "openai/gpt-4o",
        "agent": "planner", "prompt_tokens": 10, "completion_tokens": 5,
    }  # fmt: skip
    fields.update(change)
    return pb.RecordUsageRequest(**fields)


def check(**change: Any) -> pb.CheckLimitRequest:
    return pb.CheckLimitRequest(**{"user_id": USER, "estimated_cost_usd": "0.5", **change})


def rotate(**change: Any) -> pb.RotateKeyRequest:
    return pb.RotateKeyRequest(**{"user_id": USER, "request_id": "rot-1", **change})


def provision(**change: Any) -> pb.ProvisionKeyRequest:
    return pb.ProvisionKeyRequest(**{"user_id": "newbie", "tier": "free", "request_id": "prov-new", **change})


def update(**change: Any) -> pb.UpdateKeyRequest:
    return pb.UpdateKeyRequest(**{"user_id": USER, **change})


def seconds(value: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=value)


def summary(**change: Any) -> pb.GetUsageSummaryRequest:
    return pb.GetUsageSummaryRequest(**{"user_id": USER, **change})


BAD_USER_IDS = {
    "empty": "",
    "129 chars": "u" * 129,
    "space": "al ice",
    "unicode": "ålice",
    "nul": "al\x00ice",
    "tab": "al\tice",
    "slash": "a/b",
}
BAD_REQUEST_IDS = {"empty": "", "201 chars": "r" * 201, "space": "gen 1", "tab": "gen\t1", "unicode": "gén-1"}
BAD_COSTS = {
    "negative": "-1",
    "NaN": "NaN",
    "Infinity": "Infinity",
    "exponent": "1e3",
    "letters": "abc",
    "empty": "",
    "11 fraction digits": "0.00000000001",
    "13 integer digits": "1234567890123",
    "plus sign": "+1",
    "leading space": " 1",
    "comma": "1,5",
    "underscore": "1_000",
    "non-ascii digit": "١",
    "trailing point": "1.",
}


def cases() -> list[Any]:
    found: list[Any] = []

    def add(case_id: str, rpc: str, request: Any, field: str, bug: str | None = None) -> None:
        marks = [pytest.mark.xfail(strict=True, reason=f"BUG: {bug}")] if bug else []
        found.append(pytest.param(Case(rpc, request, field), id=case_id, marks=marks))

    for name, cost in BAD_COSTS.items():
        add(f"cost_usd {name}", "RecordUsage", usage(cost_usd=cost), "cost_usd")
    for name, user in BAD_USER_IDS.items():
        add(f"GetKey user_id {name}", "GetKey", pb.GetKeyRequest(user_id=user), "user_id")
        add(f"RecordUsage user_id {name}", "RecordUsage", usage(user_id=user), "user_id")
    for rpc, build in (("CheckLimit", check), ("RotateKey", rotate), ("ProvisionKey", provision)):
        add(f"{rpc} user_id 129 chars", rpc, build(user_id="u" * 129), "user_id")
        add(f"{rpc} user_id space", rpc, build(user_id="a b"), "user_id")
    add("UpdateKey user_id empty", "UpdateKey", pb.UpdateKeyRequest(user_id="", tier="standard"), "user_id")
    add("RevokeKey user_id unicode", "RevokeKey", pb.RevokeKeyRequest(user_id="ålice"), "user_id")
    add("GetUsageSummary user_id control", "GetUsageSummary", summary(user_id="a\x01"), "user_id")
    for name, request_id in BAD_REQUEST_IDS.items():
        add(f"RecordUsage request_id {name}", "RecordUsage", usage(request_id=request_id), "request_id")
        add(f"RotateKey request_id {name}", "RotateKey", rotate(request_id=request_id), "request_id")
        add(f"ProvisionKey request_id {name}", "ProvisionKey", provision(request_id=request_id), "request_id")
    add("CheckLimit request_id space", "CheckLimit", check(request_id="chk 1"), "request_id")
    add("CheckLimit request_id 201", "CheckLimit", check(request_id="c" * 201), "request_id")

    for estimate in ("0", "0.0", "-1", "abc", "1e2", "0.00000000001"):
        add(
            f"estimated_cost_usd {estimate}",
            "CheckLimit",
            check(estimated_cost_usd=estimate),
            "estimated_cost_usd",
        )

    for name, value in (("not a uuid", "not-a-uuid"), ("short", "1234"), ("uuid plus", RESERVATION + "0")):
        add(
            f"RecordUsage reservation_id {name}", "RecordUsage", usage(reservation_id=value), "reservation_id"
        )
        request = pb.ReleaseReservationRequest(user_id=USER, reservation_id=value)
        add(f"ReleaseReservation reservation_id {name}", "ReleaseReservation", request, "reservation_id")
    add(
        "ReleaseReservation reservation_id empty",
        "ReleaseReservation",
        pb.ReleaseReservationRequest(user_id=USER),
        "reservation_id",
    )

    for field in ("prompt_tokens", "completion_tokens", "total_tokens"):
        add(f"{field} negative", "RecordUsage", usage(**{field: -1}), field)
        add(f"{field} over 10^12", "RecordUsage", usage(**{field: 10**12 + 1}), field)
    for field in ("model", "agent"):
        add(f"{field} control char", "RecordUsage", usage(**{field: "gpt\x07"}), field)
        add(f"{field} newline", "RecordUsage", usage(**{field: "a\nb"}), field)
        add(f"{field} 201 chars", "RecordUsage", usage(**{field: "m" * 201}), field)

    add("duration negative", "RecordUsage", usage(duration=seconds(-1)), "duration")
    add(
        "duration negative nanos",
        "RecordUsage",
        usage(duration=duration_pb2.Duration(nanos=-1000)),
        "duration",
    )
    add("duration over 24h", "RecordUsage", usage(duration=seconds(DAY + 1)), "duration")
    add("grace_period negative", "RotateKey", rotate(grace_period=seconds(-1)), "grace_period")
    add("grace_period over 30 days", "RotateKey", rotate(grace_period=seconds(30 * DAY + 1)), "grace_period")

    for month in ("2026-13", "2026-00", "26-01", "2026-1", "2026-01-01", "1999-12", "3000-01", "2026/01"):
        add(f"month {month}", "GetUsageSummary", summary(month=month), "month")

    add("ProvisionKey tier Gold!", "ProvisionKey", provision(tier="Gold!"), "tier")
    add("ProvisionKey tier platinum", "ProvisionKey", provision(tier="platinum"), "tier")
    add(
        "ProvisionKey monthly_limit_usd -5",
        "ProvisionKey",
        provision(monthly_limit_usd="-5"),
        "monthly_limit_usd",
    )
    add(
        "ProvisionKey monthly_limit_usd NaN",
        "ProvisionKey",
        provision(monthly_limit_usd="NaN"),
        "monthly_limit_usd",
    )
    add("UpdateKey tier Gold!", "UpdateKey", update(tier="Gold!"), "tier")
    add("UpdateKey tier platinum", "UpdateKey", update(tier="platinum"), "tier")
    add("UpdateKey monthly_limit_usd -5", "UpdateKey", update(monthly_limit_usd="-5"), "monthly_limit_usd")
    add("UpdateKey monthly_limit_usd 1e3", "UpdateKey", update(monthly_limit_usd="1e3"), "monthly_limit_usd")

    add("page_size -1", "ListKeys", pb.ListKeysRequest(page_size=-1), "page_size")
    add("page_size 1001", "ListKeys", pb.ListKeysRequest(page_size=1001), "page_size")
    add("page_token garbage", "ListKeys", pb.ListKeysRequest(page_token="not a token"), "page_token")
    add("tier trailing newline", "ProvisionKey", provision(tier="free\n"), "tier")

    # Newlines that `$` let through, Durations beyond timedelta, page tokens that are no tokens.
    add("GetKey user_id trailing newline", "GetKey", pb.GetKeyRequest(user_id="alice\n"), "user_id")
    add("ProvisionKey user_id trailing newline", "ProvisionKey", provision(user_id="new\n"), "user_id")
    add("RecordUsage request_id trailing newline", "RecordUsage", usage(request_id="g\n"), "request_id")
    add("CheckLimit request_id trailing newline", "CheckLimit", check(request_id="c\n"), "request_id")
    add("month trailing newline", "GetUsageSummary", summary(month="2026-01\n"), "month")
    add("duration beyond timedelta", "RecordUsage", usage(duration=seconds(10**14)), "duration")
    add("grace_period beyond timedelta", "RotateKey", rotate(grace_period=seconds(10**14)), "grace_period")
    add("page_token of a NUL byte", "ListKeys", pb.ListKeysRequest(page_token="AA"), "page_token")
    add("page_token of no base64", "ListKeys", pb.ListKeysRequest(page_token="!!!"), "page_token")

    # A known server bug (see the reason); strict, so a fix turns it into a failure to un-mark.
    add("month fullwidth digits", "GetUsageSummary", summary(month="２０２６-０１"), "month")
    return found


@pytest.fixture(scope="module")
async def served(
    pg_admin_url: str, template_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Broker, Sandbox]]:
    """One broker for the whole module (as tests/conftest.py builds it), with one provisioned
    user so a request that slipped through validation would write rows. Passing cases write
    nothing, so they can share it; each case compares its own before/after counts."""
    name = f"kbval_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(pg_admin_url)
    try:
        await admin.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
    finally:
        await admin.close()
    clock = TestClock()
    box = Sandbox("sandbox-management-" + secrets.token_hex(8), clock=clock)
    await box.start("127.0.0.1", 0)
    settings = broker_settings(url_for_database(pg_admin_url, name), box, tmp_path_factory.mktemp("val"))
    try:
        async with open_runtime(settings, clock) as runtime, serving(runtime) as server:
            admin_token = await runtime.authority.create("test-admin", "admin", "test")
            agent_token = await runtime.authority.create("test-agent", "agent", "test")
            target = f"127.0.0.1:{server.port}"
            async with grpc.aio.insecure_channel(target) as channel:
                broker = Broker(runtime, server, target, channel, admin_token.token, agent_token.token)
                await broker.provision(USER, tier="standard")
                yield broker, box
    finally:
        await box.stop()
        admin = await asyncpg.connect(pg_admin_url)
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await admin.close()


async def row_counts(conn: asyncpg.Connection) -> dict[str, int]:
    """Rows of every table of the schema (the broker's seven and any later one)."""
    tables = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1")
    names = [r["tablename"] for r in tables if r["tablename"] not in BACKGROUND_TABLES]
    assert set(BROKER_TABLES) <= set(names)
    return {name: await conn.fetchval(f'SELECT count(*) FROM "{name}"') for name in names}  # noqa: S608


async def call(broker: Broker, rpc: str, request: Any) -> Any:
    if rpc in AGENT_RPCS:
        return await getattr(broker.agent, rpc)(request, metadata=broker.as_agent(), timeout=10)
    return await getattr(broker.admin, rpc)(request, metadata=broker.as_admin(), timeout=10)


async def live_provider_keys(sandbox: Sandbox) -> int:
    return sum(1 for key in sandbox.state.all_keys() if not key.deleted)


@pytest.mark.parametrize("case", cases())
async def test_malformed_request_is_invalid_argument_naming_the_field_and_writes_nothing(
    served: tuple[Broker, Sandbox], case: Case
) -> None:
    broker, sandbox = served
    conn = await broker.db()
    try:
        before = await row_counts(conn)
        keys_before = await live_provider_keys(sandbox)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call(broker, case.rpc, case.request)
        assert_invalid_argument(refused.value, case.field)
        assert await row_counts(conn) == before
        assert await live_provider_keys(sandbox) == keys_before
        assert len(sandbox.state.all_keys()) == keys_before, "no provider key was created"
    finally:
        await conn.close()


async def test_the_well_formed_baselines_of_these_cases_succeed_and_do_write(broker: Broker) -> None:
    """Each case above changes one field of these requests; unchanged they are accepted and write
    rows, so the 'writes nothing' checks above can fail."""
    await broker.provision(USER, tier="standard")
    conn = await broker.db()
    try:
        for rpc, request in (
            ("RecordUsage", usage()),
            ("CheckLimit", check(request_id="chk-1")),
            ("GetKey", pb.GetKeyRequest(user_id=USER)),
            ("RotateKey", rotate(grace_period=seconds(60))),
            ("ProvisionKey", provision()),
            ("UpdateKey", update(tier="operator", monthly_limit_usd="12.5")),
        ):
            before = await row_counts(conn)
            await call(broker, rpc, request)
            assert await row_counts(conn) != before, rpc
        for month in ("2026-01", ""):
            await call(broker, "GetUsageSummary", summary(month=month))
        listed = await call(broker, "ListKeys", pb.ListKeysRequest(page_size=1000))
        assert [k.user_id for k in listed.keys] == [USER, "newbie"]
    finally:
        await conn.close()
