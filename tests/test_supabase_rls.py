"""Row-level security for Supabase (sql/0006_supabase_rls.sql), on the embedded server with a
stand-in Supabase environment: schema auth with auth.uid(), roles authenticated, anon and
service_role, made before the migrations run; and the same migrations as a no-op elsewhere."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal

import asyncpg
import pytest

from broker.migrations import migrate
from tests.conftest import url_for_database

ALICE = str(uuid.UUID("0b6a3d2e-1c4f-4e1a-9a57-1d2f3c4b5a61"))
BOB = str(uuid.UUID("7f3e9c1a-5b2d-4c8e-8f6a-2e4d6c8b0a13"))
OWNER = "kb_test_owner"  # stands in for the broker's own role, which runs the migrations
STAND_IN_ROLES = ("authenticated", "anon", "service_role")
SECRET_COLUMNS = {("api_keys", "sealed_secret"), ("api_keys", "kek_id"), ("caller_tokens", "secret_hash")}

STAND_IN_AUTH = f"""
    CREATE SCHEMA auth;
    CREATE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE AS
        $$ SELECT nullif(current_setting('request.jwt.claim.sub', true), '')::uuid $$;
    GRANT USAGE ON SCHEMA auth TO authenticated, anon, service_role, {OWNER};
    -- As Supabase does: every new table and function is open to the API roles until revoked.
    ALTER DEFAULT PRIVILEGES FOR ROLE {OWNER} IN SCHEMA public
        GRANT ALL ON TABLES TO anon, authenticated, service_role;
    ALTER DEFAULT PRIVILEGES FOR ROLE {OWNER} IN SCHEMA public
        GRANT ALL ON FUNCTIONS TO anon, authenticated, service_role;
"""

# One row per user in every table keyed by user_id, as the broker would have written them.
USER_ROWS = """
    INSERT INTO users (user_id, tier, current_key_version, create_time, update_time)
    VALUES ($1, 'free', 1, now(), now());
    INSERT INTO api_keys (user_id, key_version, key_id, provider_name, status, sealed_secret, kek_id,
                          limit_base_period, create_time)
    VALUES ($1, 1, 'hash-' || $1, 'keybroker:' || $1 || ':v1', 'active', '\\x5ea1ed'::bytea, 'kek-1',
            date_trunc('month', now() AT TIME ZONE 'UTC')::date, now());
    INSERT INTO usage_periods (user_id, period_start, spent_usd, reserved_usd, request_count)
    VALUES ($1, date_trunc('month', now() AT TIME ZONE 'UTC')::date, 9, 1.5, 1);
    INSERT INTO reservations (user_id, reservation_id, period_start, amount_usd, request_id, create_time,
                              expire_time)
    VALUES ($1, gen_random_uuid(), date_trunc('month', now() AT TIME ZONE 'UTC')::date, 1.5, 'res-1',
            now(), now() + interval '15 minutes');
    INSERT INTO usage_ledger (user_id, request_id, period_start, record_time, key_version, model, agent,
                              prompt_tokens, completion_tokens, total_tokens, cost_usd, duration_ms,
                              spent_after_usd, remaining_after_usd, over_limit)
    VALUES ($1, 'gen-1', date_trunc('month', now() AT TIME ZONE 'UTC')::date, now(), 1, 'openai/gpt-4o',
            'planner', 10, 5, 15, 9, 120, 9, 1, false);
    INSERT INTO usage_daily (user_id, day, model, agent, requests, prompt_tokens, completion_tokens,
                             total_tokens, cost_usd)
    VALUES ($1, (now() AT TIME ZONE 'UTC')::date, 'openai/gpt-4o', 'planner', 1, 10, 5, 15, 9);
    INSERT INTO usage_hourly (user_id, hour, requests, cost_usd)
    VALUES ($1, date_trunc('hour', now()), 1, 9);
    INSERT INTO alerts (user_id, alert_id, kind, period_start, dedup_key, threshold_percent, spent_usd,
                        reference_usd, create_time, next_attempt_time)
    VALUES ($1, gen_random_uuid(), 'THRESHOLD', date_trunc('month', now() AT TIME ZONE 'UTC')::date,
            'threshold:80', 80, 9, 10, now(), now());
    INSERT INTO alert_deliveries (user_id, alert_id, webhook_id, delivered_time)
    SELECT user_id, alert_id, 'webhook-1', now() FROM alerts WHERE user_id = $1;
    INSERT INTO audit_log (user_id, event_id, event_time, actor, action, seq, prev_hash, row_hash)
    VALUES ($1, gen_random_uuid(), now(), 'test-admin', 'key.provisioned', 1, '\\x00'::bytea,
            '\\x01'::bytea);
    INSERT INTO audit_heads (user_id, seq, row_hash) VALUES ($1, 1, '\\x01'::bytea);
    INSERT INTO key_intents (user_id, key_version, request_id, kind, provider_name, attempt, state,
                             create_time, update_time)
    VALUES ($1, 1, 'prov-1', 'provision', 'keybroker:' || $1 || ':v1', gen_random_uuid(), 'done', now(),
            now());
    INSERT INTO key_events (user_id, event_id, kind, key_id, key_version)
    VALUES ($1, gen_random_uuid(), 'PROVISIONED', 'hash-' || $1, 1);
    INSERT INTO key_invalid_reports (user_id, last_check_time, checks) VALUES ($1, now(), 1);
    INSERT INTO rate_windows (user_id, window_start, count) VALUES ($1, date_trunc('minute', now()), 1);
"""
OTHER_ROWS = """
    INSERT INTO caller_tokens (token_id, name, scope, secret_hash, create_time)
    VALUES ('tok-1', 'agent-1', 'agent', '\\xbeef'::bytea, now());
    INSERT INTO leases (name, holder, expire_time) VALUES ('retire-keys', 'replica-1', now());
"""


async def ensure_role(conn: asyncpg.Connection, name: str, options: str) -> None:
    """Roles are cluster-wide: create once, tolerate another test creating it at the same time."""
    if await conn.fetchval("SELECT to_regrole($1) IS NOT NULL", name):
        return
    with contextlib.suppress(asyncpg.DuplicateObjectError, asyncpg.UniqueViolationError):
        await conn.execute(f"CREATE ROLE {name} {options}")


@contextlib.asynccontextmanager
async def new_database(admin_url: str) -> AsyncIterator[str]:
    name = f"kbrls_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(admin_url)
    try:
        for role in STAND_IN_ROLES:
            await ensure_role(admin, role, "NOLOGIN")
        await ensure_role(admin, OWNER, "NOLOGIN CREATEROLE")
        await admin.execute(f"CREATE DATABASE {name}")
        yield url_for_database(admin_url, name)
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


@pytest.fixture
async def supabase(pg_admin_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A migrated stand-in Supabase database with rows for ALICE and BOB; a superuser connection."""
    async with new_database(pg_admin_url) as url:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(STAND_IN_AUTH)
            await conn.execute(f"GRANT CREATE ON SCHEMA public TO {OWNER}")
            await conn.execute(f"SET ROLE {OWNER}")
            applied = await migrate(conn)
            assert "0006_supabase_rls" in applied
            await conn.execute("RESET ROLE")
            for user in (ALICE, BOB):
                await conn.execute(USER_ROWS.replace("$1", f"'{user}'"))
            await conn.execute(OTHER_ROWS)
            yield conn
        finally:
            await conn.close()


@contextlib.asynccontextmanager
async def acting_as(
    conn: asyncpg.Connection, role: str, sub: str | None = None
) -> AsyncIterator[asyncpg.Connection]:
    """As PostgREST does it: SET ROLE and the JWT subject, local to one transaction."""
    async with conn.transaction():
        await conn.execute(f"SET LOCAL ROLE {role}")
        if sub is not None:
            await conn.execute("SELECT set_config('request.jwt.claim.sub', $1, true)", sub)
        yield conn


async def user_keyed_tables(conn: asyncpg.Connection) -> list[str]:
    rows = await conn.fetch(
        """SELECT c.relname FROM pg_class c
           JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'user_id' AND NOT a.attisdropped
           WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'r' ORDER BY 1"""
    )
    return [r[0] for r in rows]


async def visible_users(conn: asyncpg.Connection, table: str) -> set[str]:
    return {r[0] for r in await conn.fetch(f"SELECT DISTINCT user_id FROM {table}")}  # noqa: S608


# --- the policies --------------------------------------------------------------------------------


async def test_every_table_has_row_level_security_and_the_owner_is_not_forced(
    supabase: asyncpg.Connection,
) -> None:
    tables = await supabase.fetch(
        """SELECT relname, relrowsecurity, relforcerowsecurity, pg_get_userbyid(relowner) AS owner
           FROM pg_class WHERE relnamespace = 'public'::regnamespace AND relkind = 'r' ORDER BY 1"""
    )
    assert len(tables) >= 19
    for table in tables:
        assert table["relrowsecurity"], f"{table['relname']}: row-level security is off"
        assert not table["relforcerowsecurity"], f"{table['relname']}: the owner must bypass RLS"
        assert table["owner"] == OWNER
    keyed = await user_keyed_tables(supabase)
    assert {"users", "api_keys", "usage_periods", "usage_ledger", "usage_daily", "reservations", "alerts",
            "audit_log"} <= set(keyed)  # fmt: skip
    own_rows = {
        r[0]
        for r in await supabase.fetch("SELECT tablename FROM pg_policies WHERE policyname = 'kb_own_rows'")
    }
    assert own_rows == set(keyed), "every table keyed by user_id lets a user read their own rows"
    assert not await supabase.fetchval("SELECT rolcanlogin FROM pg_roles WHERE rolname = 'keybroker_admin'")


async def test_a_signed_in_user_reads_only_their_own_rows_in_every_table(
    supabase: asyncpg.Connection,
) -> None:
    for table in await user_keyed_tables(supabase):
        for user in (ALICE, BOB):
            async with acting_as(supabase, "authenticated", user) as conn:
                assert await visible_users(conn, table) == {user}, table
                assert await conn.fetchval(f"SELECT count(*) FROM {table}") >= 1  # noqa: S608
        async with acting_as(supabase, "authenticated") as conn:  # no subject: nobody's rows
            assert await visible_users(conn, table) == set(), table
    async with acting_as(supabase, "authenticated", ALICE) as conn:
        assert await conn.fetchval("SELECT count(*) FROM tiers") == 8, "the tiers are public"
        for table in ("caller_tokens", "leases", "schema_migrations"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                async with conn.transaction():
                    await conn.fetch(f"SELECT 1 FROM {table}")  # noqa: S608


async def test_a_signed_in_user_writes_nothing_and_anon_reads_nothing(supabase: asyncpg.Connection) -> None:
    statements = [
        "UPDATE users SET tier = 'beta' WHERE user_id = $1",
        "UPDATE usage_periods SET spent_usd = 0 WHERE user_id = $1",
        "DELETE FROM usage_ledger WHERE user_id = $1",
        "INSERT INTO audit_heads (user_id, seq, row_hash) VALUES ($1, 2, '\\x00')",
    ]
    for statement in statements:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with acting_as(supabase, "authenticated", ALICE) as conn:
                await conn.execute(statement, ALICE)
    for table in ("users", "api_keys", "tiers"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with acting_as(supabase, "anon") as conn:
                await conn.fetch(f"SELECT 1 FROM {table}")  # noqa: S608


async def test_no_one_but_the_owner_and_service_role_can_read_sealed_secrets(
    supabase: asyncpg.Connection,
) -> None:
    for role in ("authenticated", "keybroker_admin"):
        for table, column in SECRET_COLUMNS:
            assert not await supabase.fetchval(
                "SELECT has_column_privilege($1, $2, $3, 'SELECT')", role, table, column
            ), (role, table, column)
        for query in (
            "SELECT sealed_secret FROM api_keys",
            "SELECT kek_id FROM api_keys",
            "SELECT * FROM api_keys",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                async with acting_as(supabase, role, ALICE) as conn:
                    await conn.fetch(query)
    async with acting_as(supabase, "authenticated", ALICE) as conn:
        rows = await conn.fetch("SELECT user_id, key_id, key_version, status FROM api_keys")
        assert [tuple(r) for r in rows] == [(ALICE, f"hash-{ALICE}", 1, "active")]


async def test_seed_functions_answer_a_signed_in_user_only_about_themselves(
    supabase: asyncpg.Connection,
) -> None:
    async with acting_as(supabase, "authenticated", ALICE) as conn:
        [key] = await conn.fetch("SELECT * FROM get_user_api_key($1)", ALICE)
        assert (key["user_id"], key["key_id"], key["status"]) == (ALICE, f"hash-{ALICE}", "active")
        assert not any(isinstance(value, bytes) for value in key.values())
        assert await conn.fetch("SELECT * FROM get_user_api_key($1)", BOB) == []
        [limit] = await conn.fetch(
            "SELECT allowed, spent_usd, reserved_usd FROM check_usage_limit($1)", ALICE
        )
        assert tuple(limit) == (False, Decimal(9), Decimal("1.5"))  # 9 spent + 1.5 reserved of 10
        assert await conn.fetch("SELECT * FROM check_usage_limit($1)", BOB) == []
        assert await conn.fetchval("SELECT get_user_usage_summary($1, current_date)", ALICE) is not None
        assert await conn.fetchval("SELECT get_user_usage_summary($1, current_date)", BOB) is None
    for call in ("SELECT reset_monthly_usage()", "SELECT * FROM kb_user_state('x')"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied for function"):
            async with acting_as(supabase, "authenticated", ALICE) as conn:
                await conn.fetch(call)


async def test_the_admin_role_reads_every_row_but_changes_nothing(supabase: asyncpg.Connection) -> None:
    for table in await user_keyed_tables(supabase):
        async with acting_as(supabase, "keybroker_admin") as conn:
            assert await visible_users(conn, table) == {ALICE, BOB}, table
    async with acting_as(supabase, "keybroker_admin") as conn:
        assert await conn.fetchval("SELECT count(*) FROM tiers") == 8
        assert await conn.fetchval("SELECT name FROM caller_tokens") == "agent-1"
        assert await conn.fetchval("SELECT holder FROM leases") == "replica-1"
        assert len(await conn.fetch("SELECT user_id FROM get_user_api_key($1)", BOB)) == 1
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with acting_as(supabase, "keybroker_admin") as conn:
            await conn.execute("UPDATE users SET disabled = true WHERE user_id = $1", BOB)


async def test_service_role_manages_everything(supabase: asyncpg.Connection) -> None:
    carol = str(uuid.uuid4())
    async with acting_as(supabase, "service_role") as conn:
        await conn.execute(USER_ROWS.replace("$1", f"'{carol}'"))
        assert (
            await conn.execute("UPDATE usage_periods SET spent_usd = spent_usd + 1 WHERE user_id = $1", ALICE)
            == "UPDATE 1"
        )
        assert await conn.execute("UPDATE users SET disabled = true WHERE user_id = $1", BOB) == "UPDATE 1"
        assert await conn.execute("UPDATE caller_tokens SET revoke_time = now()") == "UPDATE 1"
        assert (
            await conn.fetchval("SELECT sealed_secret FROM api_keys WHERE user_id = $1", carol)
            == b"\x5e\xa1\xed"
        )
        assert await conn.fetchval("SELECT reset_monthly_usage()") == 0
        assert await conn.fetchval("SELECT count(*) FROM kb_user_state($1)", ALICE) == 1
    for table in await user_keyed_tables(supabase):
        assert await visible_users(supabase, table) == {ALICE, BOB, carol}, table
    assert await supabase.fetchval("SELECT spent_usd FROM usage_periods WHERE user_id = $1", ALICE) == 10
    assert await supabase.fetchval("SELECT disabled FROM users WHERE user_id = $1", BOB)


async def test_the_owning_broker_role_is_unaffected(supabase: asyncpg.Connection) -> None:
    async with acting_as(supabase, OWNER) as conn:
        for table in await user_keyed_tables(conn):
            assert await visible_users(conn, table) == {ALICE, BOB}, table
        assert await conn.fetchval("SELECT count(sealed_secret) FROM api_keys") == 2
        [state] = await conn.fetch("SELECT * FROM kb_user_state($1)", ALICE)
        assert state["key_status"] == "active"
        assert await conn.execute("DELETE FROM reservations WHERE user_id = $1", BOB) == "DELETE 1"
        assert (
            await conn.execute("UPDATE usage_periods SET reserved_usd = 0 WHERE user_id = $1", BOB)
            == "UPDATE 1"
        )


# --- elsewhere, a no-op --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "setup",
    [
        pytest.param("", id="no-auth-schema"),
        pytest.param("CREATE SCHEMA auth;", id="auth-schema-without-uid"),
    ],
)
async def test_without_supabase_the_migration_changes_nothing(pg_admin_url: str, setup: str) -> None:
    async with new_database(pg_admin_url) as url:  # the Supabase roles exist; auth.uid() does not
        conn = await asyncpg.connect(url)
        try:
            if setup:
                await conn.execute(setup)
            assert "0006_supabase_rls" in await migrate(conn)
            assert not await conn.fetchval(
                "SELECT bool_or(relrowsecurity) FROM pg_class WHERE relnamespace = 'public'::regnamespace"
            )
            assert await conn.fetchval("SELECT count(*) FROM pg_policies") == 0
            for role in STAND_IN_ROLES:
                assert not await conn.fetchval("SELECT has_table_privilege($1, 'users', 'SELECT')", role)
                assert await conn.fetchval(
                    "SELECT has_function_privilege($1, 'reset_monthly_usage()', 'EXECUTE')", role
                ), "function privileges keep their defaults"
        finally:
            await conn.close()


async def test_every_internal_function_is_for_the_owner_and_service_role_only(
    supabase: asyncpg.Connection,
) -> None:
    # Functions of every migration, 0006's own and later ones: Supabase grants EXECUTE on new
    # functions to anon and authenticated by default (the stand-in does too).
    functions = await supabase.fetch(
        "SELECT p.oid::regprocedure::text AS name FROM pg_proc p "
        "WHERE p.pronamespace = current_schema()::regnamespace AND p.proname LIKE 'kb\\_%'"
    )
    assert {
        "kb_user_state_rpm(text)",
        "kb_check_limit(text,numeric,text,uuid,timestamp with time zone,date,timestamp with time zone)",
    } <= {f["name"] for f in functions}
    for function in functions:
        for role, allowed in (("anon", False), ("authenticated", False), ("service_role", True)):
            can = await supabase.fetchval(
                "SELECT has_function_privilege($1, $2, 'EXECUTE')", role, function["name"]
            )
            assert can is allowed, (role, function["name"])
