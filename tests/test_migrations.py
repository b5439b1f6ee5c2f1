"""The schema comes only from sql/NNNN_name.sql, applied once each, in order, under a lock."""

from __future__ import annotations

import asyncio
import re
import uuid

import asyncpg
import pytest

from broker.migrations import FILE_NAME, SQL_DIR, Migration, MigrationError, discover, migrate
from tests.conftest import url_for_database

EXPECTED_TABLES = {
    "tiers",
    "users",
    "api_keys",
    "usage_periods",
    "reservations",
    "usage_ledger",
    "caller_tokens",
    "audit_log",
    "schema_migrations",
}


@pytest.fixture
async def empty_url(pg_admin_url: str):
    name = f"kbempty_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(pg_admin_url)
    await admin.execute(f"CREATE DATABASE {name}")
    yield url_for_database(pg_admin_url, name)
    await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
    await admin.close()


def test_files_are_numbered_in_order_and_named_in_snake_case() -> None:
    files = sorted(p.name for p in SQL_DIR.glob("*"))
    assert files, "sql/ holds the migrations"
    assert all(FILE_NAME.match(name) for name in files), files
    versions = [int(name[:4]) for name in files]
    assert versions == list(range(1, len(files) + 1))
    assert [m.version for m in discover()] == versions


def test_a_gap_in_numbering_is_refused(tmp_path) -> None:
    (tmp_path / "0001_a.sql").write_text("SELECT 1;")
    (tmp_path / "0003_c.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match="0002"):
        discover(tmp_path)


def test_a_badly_named_file_is_refused(tmp_path) -> None:
    (tmp_path / "1_Init.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match="NNNN"):
        discover(tmp_path)


async def test_empty_database_is_built_by_the_migrations_and_tiers_are_seeded(empty_url: str) -> None:
    conn = await asyncpg.connect(empty_url)
    try:
        applied = await migrate(conn)
        assert applied == [f"{m.version:04d}_{m.name}" for m in discover()]
        tables = {
            r["tablename"]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname='public'")
        }
        assert EXPECTED_TABLES <= tables
        tiers = dict(await conn.fetch("SELECT name, monthly_limit_usd FROM tiers"))
        assert {k: (None if v is None else str(v.normalize())) for k, v in tiers.items()} == {
            "free": "1E+1",
            "standard": "5E+1",
            "micro": "1E+2",
            "operator": "2.5E+2",
            "enterprise": "5E+2",
            "beta": "1E+3",
            "admin": None,
            "future4200": None,
        }
        assert await migrate(conn) == [], "a second run applies nothing"
        recorded = await conn.fetchval("SELECT count(*) FROM schema_migrations")
        assert recorded == len(discover())
    finally:
        await conn.close()


async def test_two_processes_migrating_at_once_apply_each_migration_once(empty_url: str) -> None:
    conns = [await asyncpg.connect(empty_url) for _ in range(4)]
    try:
        results = await asyncio.gather(*(migrate(c) for c in conns))
        assert sorted(len(r) for r in results) == [0, 0, 0, len(discover())]
        assert await conns[0].fetchval("SELECT count(*) FROM schema_migrations") == len(discover())
    finally:
        for c in conns:
            await c.close()


async def test_an_edited_migration_is_detected(empty_url: str) -> None:
    conn = await asyncpg.connect(empty_url)
    try:
        await migrate(conn)
        changed = [Migration(m.version, m.name, m.sql + "\n-- edited") for m in discover()]
        with pytest.raises(MigrationError, match="changed after it was applied"):
            await migrate(conn, changed)
    finally:
        await conn.close()


def test_money_columns_are_numeric_never_float() -> None:
    text = "\n".join(m.sql for m in discover()).lower()
    assert not re.search(r"\b(real|double precision|float[48]?)\b", text)
