"""`keybroker serve --workers N`: N server processes on one port (SO_REUSEPORT), each with its
own pool, under a parent that only supervises.

The parent
- settles the listen address: a TCP HOST:PORT that every worker binds (port 0 becomes one free
  port, a port already in use is an error, before anything starts);
- with no management key runs ONE OpenRouter sandbox and hands its URL and key to every worker
  through the environment (never the command line, which `ps` shows), so that all workers see
  the same fake OpenRouter;
- with no database URL starts the embedded PostgreSQL once (the workers attach to the same data
  directory), applies the migrations, makes the development token and prints the grpcurl example,
  once;
- starts the workers (`python -m broker serve --pool-worker I`), forwards SIGTERM and SIGINT to
  them and waits for them. It restarts nothing: when a worker dies by itself the parent stops
  the others and exits non-zero, so whatever runs the broker (systemd, Kubernetes) sees the
  failure and restarts the whole.

The kernel spreads connections over the workers, not calls: a client with one channel (one
HTTP/2 connection) talks to one worker for the channel's life. Clients need several channels.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack

from broker.app import Runtime, _sandbox, open_runtime, run_until_signal
from broker.config import ConfigError, Settings, child_environment
from broker.server import BrokerServer

log = logging.getLogger("keybroker.workers")

WORKER_FLAG = "--pool-worker"  # hidden `serve` option: run as worker I of a supervised pool
READY_TIMEOUT = 120.0  # seconds for the first worker to accept connections
KILL_AFTER = 10.0  # seconds past the shutdown grace before a worker that will not stop is killed
ORPHAN_CHECK = 1.0  # seconds between a worker's checks that its parent is still there

Announce = Callable[[Runtime, str], Awaitable[None]]


def resolve_listen(listen: str) -> str:
    """The address all workers bind: port 0 replaced by a free port; a busy port refused now,
    with a clear message, rather than by N workers failing one after the other."""
    host, colon, port_text = listen.rpartition(":")
    if not colon or not host or listen.startswith("unix:") or not port_text.isdigit():
        raise ConfigError(f"--workers needs a TCP HOST:PORT listen address, not {listen!r}")
    bind_host = host.removeprefix("[").removesuffix("]")
    family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # No SO_REUSEPORT here: the bind fails if anything (another broker included) listens.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((bind_host, int(port_text)))
            port = int(probe.getsockname()[1])
    except OSError as exc:
        raise ConfigError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
    return f"{host}:{port}"


async def supervise(settings: Settings, workers: int, announce: Announce | None = None) -> int:
    """Run `workers` worker processes until SIGTERM/SIGINT (0) or until one dies (1).
    `announce(runtime, target)` runs once, in embedded mode, when the port accepts connections."""
    stop = _StopSignal()
    listen = resolve_listen(settings.listen)
    settings = settings.with_overrides(listen=listen)
    overrides = {"KEYBROKER_LISTEN": listen}
    async with AsyncExitStack() as stack:
        if settings.uses_sandbox:
            key = secrets.token_urlsafe(24)
            url = await stack.enter_async_context(_sandbox(key))
            overrides |= {"OPENROUTER_MANAGEMENT_KEY": key, "OPENROUTER_BASE_URL": url}
            settings = settings.with_overrides(management_key=key, openrouter_base_url=url)
        pool = WorkerPool(workers, listen, child_environment(overrides), settings)
        try:
            if settings.embedded_database:
                # Starts the server (this process keeps it until it exits) and migrates, once.
                async with open_runtime(settings) as runtime:
                    await pool.start(stop)
                    if await pool.wait_accepting(stop) and announce is not None:
                        await announce(runtime, listen)
            else:
                await pool.start(stop)
            return await pool.run(stop)
        finally:
            await pool.stop()


class _StopSignal:
    """SIGTERM/SIGINT handlers, installed at once so that a signal during start-up is kept."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.signum: int | None = None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, self._set, sig)

    def _set(self, sig: signal.Signals) -> None:
        self.signum = self.signum or int(sig)
        self.event.set()


def metrics_listen(listen: str | None, index: int) -> str:
    """Worker `index`'s KEYBROKER_METRICS_LISTEN: each worker has its own registry, so each serves
    /metrics on a port of its own, the configured one plus its index (a scrape target each)."""
    if listen is None:
        return "off"
    host, _, port = listen.rpartition(":")
    return listen if int(port) == 0 else f"{host}:{int(port) + index}"


class WorkerPool:
    def __init__(self, size: int, listen: str, env: dict[str, str], settings: Settings) -> None:
        self.size = size
        self.listen = listen
        self.env = env
        self.grace = settings.shutdown_grace
        self.metrics_listen = settings.metrics_listen
        self.procs: list[asyncio.subprocess.Process] = []

    async def start(self, stop: _StopSignal) -> None:
        for index in range(self.size):
            if stop.event.is_set():
                return
            argv = [sys.executable, "-m", "broker", "serve", "--listen", self.listen]
            env = {**self.env, "KEYBROKER_METRICS_LISTEN": metrics_listen(self.metrics_listen, index)}
            proc = await asyncio.create_subprocess_exec(
                *argv, WORKER_FLAG, str(index), env=env, stdin=asyncio.subprocess.DEVNULL
            )
            self.procs.append(proc)
        pids = ", ".join(str(proc.pid) for proc in self.procs)
        log.info("started %d workers on %s (pids %s)", self.size, self.listen, pids)

    async def wait_accepting(self, stop: _StopSignal) -> bool:
        """True once the port accepts a connection; False if a worker exited or a signal came."""
        host, _, port = self.listen.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_TIMEOUT
        while loop.time() < deadline and not stop.event.is_set():
            if any(proc.returncode is not None for proc in self.procs):
                return False
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 2.0)
            except (OSError, TimeoutError):
                await asyncio.sleep(0.1)
                continue
            writer.close()
            return True
        return False

    async def run(self, stop: _StopSignal) -> int:
        """Wait for a signal (forwarded to every worker) or for a worker to exit (the others are
        stopped); then wait for all. 0 only if stopped by a signal and every worker exited 0."""
        exits = {asyncio.ensure_future(proc.wait()): proc for proc in self.procs}
        signalled = asyncio.ensure_future(stop.event.wait())
        try:
            done, _ = await asyncio.wait([signalled, *exits], return_when=asyncio.FIRST_COMPLETED)
        finally:
            signalled.cancel()
        failed = [proc for task, proc in exits.items() if task in done]
        for proc in failed:
            log.error("worker pid %d exited with %s; stopping the others", proc.pid, proc.returncode)
        if not failed:
            log.info("stopping %d workers", len(self.procs))
        await self.stop(stop.signum or signal.SIGTERM)
        codes = [proc.returncode for proc in self.procs]
        return 0 if not failed and all(code == 0 for code in codes) else 1

    async def stop(self, signum: int = signal.SIGTERM) -> None:
        """Signal every live worker and wait; kill what is still there after the grace."""
        live = [proc for proc in self.procs if proc.returncode is None]
        for proc in live:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)
        waiting = asyncio.gather(*(proc.wait() for proc in live))
        try:
            await asyncio.wait_for(asyncio.shield(waiting), self.grace + KILL_AFTER)
        except TimeoutError:
            for proc in live:
                if proc.returncode is None:
                    log.error("worker pid %d did not stop; killing it", proc.pid)
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            await waiting


async def run_worker(server: BrokerServer) -> None:
    """A worker serves until SIGTERM/SIGINT, or until its parent is gone (a supervisor killed
    with SIGKILL cannot stop its workers; they must not keep the port on their own)."""
    parent = os.getppid()

    async def orphaned() -> None:
        while True:  # no event tells a process that its parent died: look now and then
            await asyncio.sleep(ORPHAN_CHECK)
            if os.getppid() != parent:
                break
        log.warning("the supervising process %d is gone; shutting down", parent)

    tasks = [asyncio.ensure_future(run_until_signal(server)), asyncio.ensure_future(orphaned())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
