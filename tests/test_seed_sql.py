"""The seed project's SQL functions (sql/0005_seed_compatibility.sql), checked exactly against state
made through the running broker: users provisioned, usage recorded and budget reserved over gRPC."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from google.protobuf import duration_pb2
from keybroker.v1 import keybroker_pb2 as pb

from tests.conftest import Broker, TestClock

KEY_COLUMNS = [
    "user_id", "key_id", "key_version", "tier", "monthly_limit_usd", "status", "created_at", "rotated_at",
]  # fmt: skip
LIMIT_COLUMNS = [
    "allowed", "limit_usd", "spent_usd", "reserved_usd", "remaining_usd", "unlimited", "period_start",
]  # fmt: skip


@pytest.fixture
async def db(broker: Broker) -> AsyncIterator[asyncpg.Connection]:
    conn = await broker.db()
    yield conn
    await conn.close()


async def record(
    broker: Broker,
    user: str,
    request_id: str,
    cost: str,
    model: str = "openai/gpt-4o",
    tokens: tuple[int, int] = (10, 5),
    reservation_id: str = "",
) -> pb.RecordUsageResponse:
    prompt, completion = tokens
    request = pb.RecordUsageRequest(
        user_id=user, request_id=request_id, reservation_id=reservation_id, model=model, agent="planner",
        cost_usd=cost, prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
    )  # fmt: skip
    return await broker.agent.RecordUsage(request, metadata=broker.as_agent(), timeout=10)


async def reserve(broker: Broker, user: str, estimate: str) -> pb.CheckLimitResponse:
    reply = await broker.agent.CheckLimit(
        pb.CheckLimitRequest(user_id=user, estimated_cost_usd=estimate),
        metadata=broker.as_agent(),
        timeout=10,
    )
    assert reply.allowed and reply.reservation_id
    return reply


async def key_info(broker: Broker, user: str) -> pb.KeyInfo:
    reply = await broker.admin.GetKeyInfo(pb.GetKeyInfoRequest(user_id=user), metadata=broker.as_admin())
    return reply.key


async def seed_key(db: asyncpg.Connection, user: str) -> list[dict[str, Any]]:
    return [dict(r) for r in await db.fetch("SELECT * FROM get_user_api_key($1)", user)]


async def seed_limit(db: asyncpg.Connection, user: str) -> list[dict[str, Any]]:
    return [dict(r) for r in await db.fetch("SELECT * FROM check_usage_limit($1)", user)]


async def seed_summary(db: asyncpg.Connection, user: str, month_date: date) -> Any:
    """The summary JSON with every number parsed exactly (Decimal for fractions, int otherwise)."""
    text = await db.fetchval("SELECT get_user_usage_summary($1, $2)", user, month_date)
    return None if text is None else json.loads(text, parse_float=Decimal)


def utc(stamp: Any) -> datetime:
    return stamp.ToDatetime(tzinfo=UTC)


# --- get_user_api_key ----------------------------------------------------------------------------


async def test_get_user_api_key_returns_the_current_keys_metadata_for_every_state(
    broker: Broker, db: asyncpg.Connection
) -> None:
    await broker.provision("alice", tier="free")
    await broker.provision("bob", tier="standard", limit="25.5")
    await broker.provision("carol", tier="admin")
    await broker.provision("dave", tier="micro")
    await broker.provision("erin", tier="beta")
    await broker.agent.RotateKey(
        pb.RotateKeyRequest(
            user_id="bob", request_id="rot-1", grace_period=duration_pb2.Duration(seconds=60)
        ),
        metadata=broker.as_agent(),
    )
    await broker.admin.UpdateKey(
        pb.UpdateKeyRequest(user_id="dave", disabled=True), metadata=broker.as_admin()
    )
    await broker.admin.RevokeKey(pb.RevokeKeyRequest(user_id="erin"), metadata=broker.as_admin())

    expected = {
        "alice": ("free", Decimal(10), "active"),
        "bob": ("standard", Decimal("25.5"), "active"),
        "carol": ("admin", None, "active"),
        "dave": ("micro", Decimal(100), "disabled"),
        "erin": ("beta", Decimal(1000), "revoked"),
    }
    for user, (tier, limit, status) in expected.items():
        info = await key_info(broker, user)
        rows = await seed_key(db, user)
        assert len(rows) == 1, user
        assert list(rows[0]) == KEY_COLUMNS
        assert rows[0] == {
            "user_id": user,
            "key_id": info.key_id,
            "key_version": info.key_version,
            "tier": tier,
            "monthly_limit_usd": limit,
            "status": status,
            "created_at": utc(info.create_time),
            "rotated_at": utc(info.rotate_time) if user == "bob" else None,
        }, user
    assert (await seed_key(db, "bob"))[0]["key_version"] == 2
    assert str((await seed_key(db, "bob"))[0]["monthly_limit_usd"]) == "25.5", "trimmed, exact"
    assert await seed_key(db, "nobody") == [], "an unknown user has no row"


async def test_get_user_api_key_never_returns_anything_secret(broker: Broker, db: asyncpg.Connection) -> None:
    await broker.provision("alice", tier="standard")
    secret = (
        await broker.agent.GetKey(pb.GetKeyRequest(user_id="alice"), metadata=broker.as_agent())
    ).api_key
    assert secret

    [row] = await seed_key(db, "alice")
    assert not any(isinstance(value, bytes | bytearray | memoryview) for value in row.values())
    assert all(secret not in str(value) for value in row.values())
    kek_id = await db.fetchval("SELECT kek_id FROM api_keys WHERE user_id = 'alice'")
    assert kek_id not in row.values()

    # What the function can return, from the catalogue: no secret column, no binary column.
    result = await db.fetchval("SELECT pg_get_function_result('get_user_api_key(text)'::regprocedure)")
    assert result == (
        "TABLE(user_id text, key_id text, key_version bigint, tier text, monthly_limit_usd numeric, "
        "status text, created_at timestamp with time zone, rotated_at timestamp with time zone)"
    )
    source = await db.fetchval(
        "SELECT prosrc FROM pg_proc WHERE oid = 'get_user_api_key(text)'::regprocedure"
    )
    assert "sealed_secret" not in source and "kek_id" not in source


# --- check_usage_limit ---------------------------------------------------------------------------


async def test_check_usage_limit_reports_this_months_spend_reservations_and_limit(
    broker: Broker, db: asyncpg.Connection, clock: TestClock
) -> None:
    period = await db.fetchval("SELECT date_trunc('month', now() AT TIME ZONE 'UTC')::date")
    await broker.provision("alice", tier="free")
    await broker.provision("bob", tier="free", limit="0.25")
    await broker.provision("carol", tier="admin")
    await broker.provision("dave", tier="standard")
    await broker.provision("erin", tier="standard")
    await record(broker, "alice", "a-1", "0.1")
    await record(broker, "alice", "a-2", "0.2")
    await reserve(broker, "alice", "1.5")
    await record(broker, "bob", "b-1", "0.3")  # recorded although past the limit: it happened
    await record(broker, "carol", "c-1", "5")
    await record(broker, "erin", "e-1", "1")
    await broker.admin.UpdateKey(
        pb.UpdateKeyRequest(user_id="erin", disabled=True), metadata=broker.as_admin()
    )

    def row(allowed: bool, limit: str | None, spent: str, reserved: str) -> dict[str, Any]:
        remaining = None if limit is None else Decimal(limit) - Decimal(spent) - Decimal(reserved)
        return {
            "allowed": allowed,
            "limit_usd": None if limit is None else Decimal(limit),
            "spent_usd": Decimal(spent),
            "reserved_usd": Decimal(reserved),
            "remaining_usd": remaining,
            "unlimited": limit is None,
            "period_start": period,
        }

    assert await seed_limit(db, "alice") == [row(True, "10", "0.3", "1.5")]
    assert await seed_limit(db, "bob") == [row(False, "0.25", "0.3", "0")]
    assert await seed_limit(db, "carol") == [row(True, None, "5", "0")]
    assert await seed_limit(db, "dave") == [row(True, "50", "0", "0")], "no usage yet"
    assert await seed_limit(db, "erin") == [row(False, "50", "1", "0")], "a disabled key may not spend"
    assert await seed_limit(db, "nobody") == [], "an unknown user has no row"
    [alice] = await seed_limit(db, "alice")
    assert list(alice) == LIMIT_COLUMNS
    assert (str(alice["limit_usd"]), str(alice["remaining_usd"])) == ("10", "8.2"), "trimmed, exact"
    assert (await seed_limit(db, "bob"))[0]["remaining_usd"] == Decimal("-0.05")

    # The same answer as the CheckLimit RPC's pure check.
    check = await broker.agent.CheckLimit(pb.CheckLimitRequest(user_id="alice"), metadata=broker.as_agent())
    assert (check.allowed, check.limit_usd, check.spent_usd, check.reserved_usd, check.remaining_usd) == (
        True, "10", "0.3", "1.5", "8.2",
    )  # fmt: skip

    # A reservation past its expiry stops counting even before the background sweep releases it
    # (the broker's clock is held back so that its sweep leaves the row alone).
    second = await reserve(broker, "alice", "2")
    assert (await seed_limit(db, "alice"))[0]["reserved_usd"] == Decimal("3.5")
    clock.offset = -timedelta(hours=1)
    await db.execute(
        "UPDATE reservations SET expire_time = now() - interval '1 second' WHERE reservation_id = $1",
        second.reservation_id,
    )
    assert await seed_limit(db, "alice") == [row(True, "10", "0.3", "1.5")]


# --- get_user_usage_summary ----------------------------------------------------------------------


async def test_usage_summary_has_the_seed_shape_with_exact_decimal_costs(
    broker: Broker, db: asyncpg.Connection, clock: TestClock
) -> None:
    clock.fixed = datetime(2026, 1, 31, 23, 59, 59, tzinfo=UTC)
    await broker.provision("alice", tier="beta")
    await broker.provision("bob", tier="free")
    await record(broker, "alice", "jan-1", "9.99", tokens=(100, 50))
    clock.fixed = datetime(2026, 2, 1, 0, 0, 0, tzinfo=UTC)
    await record(broker, "alice", "feb-1", "0.1", model="openai/gpt-4o", tokens=(10, 5))
    clock.fixed = datetime(2026, 2, 14, 9, 30, tzinfo=UTC)
    await record(broker, "alice", "feb-2", "0.2", model="openai/gpt-4o", tokens=(20, 7))
    await record(broker, "alice", "feb-3", "0.0000000001", model="anthropic/claude-sonnet-4", tokens=(1, 1))
    await record(broker, "alice", "feb-4", "0", model="sandbox/free", tokens=(4, 4))
    await record(broker, "alice", "feb-2", "0.2", model="openai/gpt-4o", tokens=(20, 7))  # a retry
    clock.fixed = datetime(2026, 2, 28, 23, 59, 59, tzinfo=UTC)
    await record(broker, "alice", "feb-5", "1.5", model="anthropic/claude-sonnet-4", tokens=(300, 150))
    clock.fixed = datetime(2026, 3, 1, 0, 0, 0, tzinfo=UTC)
    await record(broker, "alice", "mar-1", "7", tokens=(1, 1))

    february = await seed_summary(db, "alice", date(2026, 2, 17))
    assert february == {
        "total_requests": 5,
        "total_tokens": 15 + 27 + 2 + 8 + 450,
        "total_cost": Decimal("1.8000000001"),
        "model_breakdown": {
            "openai/gpt-4o": {"requests": 2, "tokens": 42, "cost": Decimal("0.3")},
            "anthropic/claude-sonnet-4": {"requests": 2, "tokens": 452, "cost": Decimal("1.5000000001")},
            "sandbox/free": {"requests": 1, "tokens": 8, "cost": 0},
        },
    }
    # Exact digits, as JSON numbers (not strings), trailing zeros trimmed.
    raw = await db.fetchval("SELECT get_user_usage_summary('alice', '2026-02-01')::text")
    assert '"total_cost": 1.8000000001,' in raw and '{"cost": 0.3, ' in raw
    for day in (date(2026, 2, 1), date(2026, 2, 28)):
        assert await seed_summary(db, "alice", day) == february, "any day of the month"

    # The same figures as the GetUsageSummary RPC.
    rpc = await broker.admin.GetUsageSummary(
        pb.GetUsageSummaryRequest(user_id="alice", month="2026-02"), metadata=broker.as_admin()
    )
    assert (rpc.total_requests, rpc.total_tokens, Decimal(rpc.total_cost_usd)) == (
        february["total_requests"], february["total_tokens"], february["total_cost"],
    )  # fmt: skip
    assert {m.model: (m.requests, m.tokens, Decimal(m.cost_usd)) for m in rpc.by_model} == {
        model: (g["requests"], g["tokens"], g["cost"]) for model, g in february["model_breakdown"].items()
    }

    assert await seed_summary(db, "alice", date(2026, 1, 1)) == {
        "total_requests": 1, "total_tokens": 150, "total_cost": Decimal("9.99"),
        "model_breakdown": {"openai/gpt-4o": {"requests": 1, "tokens": 150, "cost": Decimal("9.99")}},
    }  # fmt: skip
    assert await seed_summary(db, "alice", date(2026, 3, 31)) == {
        "total_requests": 1, "total_tokens": 2, "total_cost": 7,
        "model_breakdown": {"openai/gpt-4o": {"requests": 1, "tokens": 2, "cost": 7}},
    }  # fmt: skip
    empty = {"total_requests": 0, "total_tokens": 0, "total_cost": 0, "model_breakdown": {}}
    assert await seed_summary(db, "alice", date(2026, 4, 1)) == empty, "a month without usage"
    assert await seed_summary(db, "bob", date(2026, 2, 1)) == empty, "a user without usage"
    assert await seed_summary(db, "nobody", date(2026, 2, 1)) is None, "an unknown user: SQL NULL"


# --- reset_monthly_usage -------------------------------------------------------------------------


def a_day_last_month() -> datetime:
    first_of_this_month = datetime.now(UTC).replace(day=1, hour=12, minute=0, second=0, microsecond=0)
    return (first_of_this_month - timedelta(days=1)).replace(day=10)


async def periods(db: asyncpg.Connection) -> dict[tuple[str, date], tuple[Decimal, Decimal, int]]:
    rows = await db.fetch(
        "SELECT user_id, period_start, spent_usd, reserved_usd, request_count FROM usage_periods"
    )
    return {(r[0], r[1]): (r[2], r[3], r[4]) for r in rows}


async def test_reset_monthly_usage_closes_past_periods_and_never_touches_spend(
    broker: Broker, db: asyncpg.Connection, clock: TestClock
) -> None:
    await broker.provision("alice", tier="beta")
    await broker.provision("bob", tier="beta")
    await broker.provision("carol", tier="beta")
    this_month = await db.fetchval("SELECT date_trunc('month', now() AT TIME ZONE 'UTC')::date")
    await reserve(broker, "alice", "2")  # this month: stays
    await record(broker, "carol", "c-now", "0.5")

    # Last month, by the broker's clock: spend, and reservations nobody settled.
    clock.fixed = a_day_last_month()
    last_month = clock.fixed.date().replace(day=1)
    await record(broker, "alice", "a-old", "1.25")
    settle_later = await reserve(broker, "alice", "0.5")
    await reserve(broker, "alice", "0.75")
    await reserve(broker, "bob", "3")
    await record(broker, "carol", "c-old", "4")  # a past period with nothing reserved

    before = await periods(db)
    assert before[("alice", last_month)] == (Decimal("1.25"), Decimal("1.25"), 1)
    assert before[("bob", last_month)] == (Decimal(0), Decimal(3), 0)
    ledger_before = await db.fetch("SELECT * FROM usage_ledger ORDER BY user_id, request_id")

    assert await db.fetchval("SELECT reset_monthly_usage()") == 2, "alice's and bob's last month"

    after = await periods(db)
    assert after[("alice", last_month)] == (Decimal("1.25"), Decimal(0), 1)
    assert after[("bob", last_month)] == (Decimal(0), Decimal(0), 0)
    assert after[("alice", this_month)] == before[("alice", this_month)] == (Decimal(0), Decimal(2), 0)
    assert {k: v[0] for k, v in after.items()} == {k: v[0] for k, v in before.items()}, "spend unchanged"
    assert {k: v[2] for k, v in after.items()} == {k: v[2] for k, v in before.items()}
    assert await db.fetch("SELECT * FROM usage_ledger ORDER BY user_id, request_id") == ledger_before
    left = await db.fetch("SELECT user_id, period_start, amount_usd FROM reservations")
    assert [tuple(r) for r in left] == [("alice", this_month, Decimal(2))]
    assert (await seed_limit(db, "alice"))[0]["reserved_usd"] == Decimal(2)

    assert await db.fetchval("SELECT reset_monthly_usage()") == 0, "nothing left to close"

    # Usage settling a released reservation is still recorded, without driving reserved negative.
    reply = await record(broker, "alice", "a-late", "0.4", reservation_id=settle_later.reservation_id)
    assert not reply.duplicate and Decimal(reply.spent_usd) == Decimal("1.65")
    assert (await periods(db))[("alice", last_month)] == (Decimal("1.65"), Decimal(0), 2)
