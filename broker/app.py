"""The composition root: builds every long-lived part once, and closes them in reverse order."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import secrets
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

from broker import crypto, embedded, tls
from broker.alerts import AlertJobs
from broker.auth import TokenAuthority
from broker.background import BackgroundTasks, broker_tasks
from broker.clock import Clock, system_clock
from broker.config import ConfigError, Settings
from broker.db import Database
from broker.events import KeyEventHub
from broker.health_watch import DatabaseHealthWatch
from broker.key_reports import KeyReports
from broker.keys import KeyService
from broker.leases import Leases
from broker.ledger import Ledger
from broker.metrics import Metrics
from broker.migrations import migrate
from broker.openrouter import OpenRouterClient
from broker.reconcile import Reconciler
from broker.reseal import verify_master_key
from broker.server import BrokerServer
from broker.user_binding import UserBinding

log = logging.getLogger("keybroker")


@dataclass
class Runtime:
    """The parts every entry point shares (server, command line, tests)."""

    settings: Settings
    clock: Clock
    db: Database
    ring: crypto.KeyRing
    provider: OpenRouterClient
    keys: KeyService
    ledger: Ledger
    authority: TokenAuthority
    reports: KeyReports
    reconciler: Reconciler
    leases: Leases
    # Alert delivery, anomaly detection and rate-window pruning (background tasks).
    alerts: AlertJobs
    metrics: Metrics
    sandbox_url: str | None = None


def database_url(settings: Settings) -> str:
    if settings.database_url:
        return settings.database_url
    return embedded.start_postgres(settings.data_dir)


def key_ring(settings: Settings) -> crypto.KeyRing:
    spec = settings.master_key
    if spec is None:
        if not settings.embedded_database:
            raise ConfigError("KEYBROKER_MASTER_KEY is required with KEYBROKER_DATABASE_URL")
        spec = embedded.master_key(settings.data_dir)
    try:
        return crypto.parse_master_key(spec)
    except crypto.MasterKeyError as exc:
        raise ConfigError(str(exc)) from None


@asynccontextmanager
async def open_runtime(
    settings: Settings, clock: Clock = system_clock, *, apply_migrations: bool = True
) -> AsyncIterator[Runtime]:
    """Open database, provider client and services; closes them all on exit."""
    async with AsyncExitStack() as stack:
        ring = key_ring(settings)
        db = await Database.connect(database_url(settings), settings)
        stack.push_async_callback(db.close)
        if apply_migrations:
            async with db.connection() as conn:
                applied = await migrate(conn)
            if applied:
                log.info("applied migrations: %s", ", ".join(applied))
        await verify_master_key(db, ring)
        base_url, management_key, sandbox_url = settings.openrouter_base_url, settings.management_key, None
        if management_key is None:
            management_key = secrets.token_urlsafe(24)
            sandbox_url = base_url = await stack.enter_async_context(_sandbox(management_key))
        metrics = Metrics()
        metrics.watch_pool(
            lambda: db.pool.get_size() - db.pool.get_idle_size(), lambda: db.pool.get_idle_size()
        )
        provider = OpenRouterClient(
            base_url,
            management_key,
            timeout_seconds=settings.provider_timeout,
            observer=metrics.observe_provider,
        )
        stack.push_async_callback(provider.aclose)
        keys = KeyService(db, provider, ring, clock, settings.intent_timeout)
        alerts = AlertJobs.build(db, clock, settings)
        stack.push_async_callback(alerts.aclose)
        alerts.dispatcher.on_dispatched = metrics.observe_alerts
        ledger = Ledger(db, clock, settings.reservation_ttl, settings.alert_thresholds)
        ledger.on_recorded = metrics.record_spend
        ledger.on_open_reservations = metrics.open_reservations.set
        yield Runtime(
            settings=settings,
            clock=clock,
            db=db,
            ring=ring,
            provider=provider,
            keys=keys,
            ledger=ledger,
            authority=TokenAuthority(db, clock, settings.token_cache_seconds),
            reports=KeyReports(keys, settings.invalid_report_interval),
            reconciler=Reconciler(keys, settings.drift_tolerance_usd),
            leases=Leases(db, clock),
            alerts=alerts,
            metrics=metrics,
            sandbox_url=sandbox_url,
        )


@asynccontextmanager
async def _sandbox(management_key: str) -> AsyncIterator[str]:
    from broker.sandbox import Sandbox

    sandbox = Sandbox(management_key)
    url = await sandbox.start("127.0.0.1", 0)
    log.warning(
        "*** OPENROUTER SANDBOX *** no OPENROUTER_MANAGEMENT_KEY is set: keys are issued by a local "
        "fake OpenRouter at %s; they do not work at openrouter.ai and vanish when the broker stops",
        url,
    )
    try:
        yield url
    finally:
        await sandbox.stop()


@asynccontextmanager
async def serving(runtime: Runtime, *, reuse_port: bool = False) -> AsyncIterator[BrokerServer]:
    """The gRPC server and background tasks, running until the block exits (then drained).
    `reuse_port`: SO_REUSEPORT, for the workers of `keybroker serve --workers N` (broker/workers.py)."""
    # Read the certificate and JWKS files first: a bad file is a ConfigError before anything starts.
    credentials = tls.server_credentials(runtime.settings)
    user_binding = UserBinding.from_settings(runtime.settings)
    events = KeyEventHub(runtime.db, poll_interval=runtime.settings.event_poll_interval.total_seconds())
    await events.start()
    try:
        server = BrokerServer(
            runtime.keys,
            runtime.ledger,
            runtime.authority,
            events,
            runtime.reports,
            runtime.reconciler,
            user_binding=user_binding,
            reuse_port=reuse_port,
            call_observer=runtime.metrics.observe_rpc,
        )
        port = await server.start(runtime.settings.listen, credentials)
        tasks = BackgroundTasks(
            broker_tasks(runtime.settings, runtime.keys, runtime.ledger, runtime.reconciler, runtime.alerts),
            runtime.leases,
            observe=runtime.metrics.observe_task,
        )
        server.background = tasks
        tasks.start()
        database_health = DatabaseHealthWatch(runtime.db, server.set_serving)
        database_health.start()
        if runtime.settings.metrics_listen is not None:
            runtime.metrics.serve(runtime.settings.metrics_listen)
        # Everything built so far lives until shutdown: keep it out of the garbage collector's
        # scans, which otherwise show up as pauses on the hot path.
        gc.freeze()
        # The pid tells the workers of `serve --workers N` apart (they share the port).
        log.info("keybroker listening on port %d (pid %d)", port, os.getpid(), extra={"port": port})
        try:
            yield server
        finally:
            await database_health.stop()
            await tasks.stop()
            await server.stop(runtime.settings.shutdown_grace)
            runtime.metrics.close()
    finally:
        await events.close()


async def run_until_signal(server: BrokerServer) -> None:
    """Serve until SIGTERM or SIGINT; the caller's `serving` block then drains."""
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: draining in-flight calls")
