"""Debian's `pgbouncer` in transaction mode in front of a PostgreSQL server, for
`bench/run.py --pgbouncer` and tests/test_pgbouncer.py: the broker as deployments often run it.

PgBouncer refuses to run as root. Run as root, it is started as the owner of the PostgreSQL
unix-socket directory (the embedded server's system user, who alone may open that socket), or as
`nobody` for a TCP server; its work directory (config, auth file, log) is made theirs.

The asyncpg settings that make transaction pooling safe (README "PgBouncer"): no session state
(the broker never leaves any: advisory locks are transaction-level, leases are rows, LISTEN falls
back to polling) and, before PgBouncer 1.21, no named prepared statements: the broker's
KEYBROKER_DB_STATEMENT_CACHE_SIZE=0. From 1.21 on, PgBouncer tracks protocol-level prepared
statements itself when `max_prepared_statements` > 0, and asyncpg's cache can stay on.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

PREPARED_STATEMENTS_SINCE = (1, 21)  # first PgBouncer with max_prepared_statements
START_TIMEOUT = 20.0


class PgBouncerError(RuntimeError):
    """pgbouncer is missing, or did not start (the message carries its log's tail)."""


def find_binary() -> str | None:
    found = shutil.which("pgbouncer")
    if found:
        return found
    return "/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None


def version(binary: str) -> tuple[int, int, int]:
    """(1, 18, 0) from `pgbouncer --version` ("PgBouncer 1.18.0")."""
    done = subprocess.run([binary, "--version"], capture_output=True, timeout=10, check=False)
    match = re.search(r"PgBouncer (\d+)\.(\d+)(?:\.(\d+))?", done.stdout.decode("utf-8", "replace"))
    if not match:
        raise PgBouncerError(f"cannot tell the version of {binary}")
    return int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)


def supports_prepared_statements(found: tuple[int, int, int]) -> bool:
    return found[:2] >= PREPARED_STATEMENTS_SINCE


@dataclass(frozen=True)
class Upstream:
    """Where PgBouncer connects: a host (or unix-socket directory), port and credentials."""

    host: str
    port: int
    user: str
    password: str

    @classmethod
    def from_dsn(cls, dsn: str) -> Upstream:
        parts = urlsplit(dsn)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        host = query.get("host") or parts.hostname or "127.0.0.1"
        port = int(query.get("port") or parts.port or 5432)
        user = unquote(parts.username or query.get("user") or "postgres")
        password = unquote(parts.password or query.get("password") or "")
        return cls(host, port, user, password)


@dataclass
class PgBouncer:
    proc: subprocess.Popen[bytes]
    work_dir: Path
    port: int
    user: str
    version: tuple[int, int, int]
    max_prepared_statements: int

    @property
    def pid(self) -> int:
        return self.proc.pid

    def dsn(self, database: str) -> str:
        """The DSN the broker uses: PgBouncer on 127.0.0.1, any database of the upstream."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = (self.work_dir / "pgbouncer.log").read_text("utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # "safe shutdown" is SIGINT; SIGTERM is immediate
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        shutil.rmtree(self.work_dir, ignore_errors=True)


def start(
    upstream_dsn: str,
    *,
    pool_size: int = 20,
    max_prepared_statements: int = 200,
    binary: str | None = None,
) -> PgBouncer:
    """Start pgbouncer (transaction mode, trust auth, 127.0.0.1 on a free port) in front of the
    server of `upstream_dsn`; every database name is passed through. `max_prepared_statements`
    is set only where the version supports it (else 0)."""
    binary = binary or find_binary()
    if binary is None:
        raise PgBouncerError("pgbouncer is not installed (apt-get install -y pgbouncer)")
    found = version(binary)
    if not supports_prepared_statements(found):
        max_prepared_statements = 0
    upstream = Upstream.from_dsn(upstream_dsn)
    run_as = _run_as(upstream)
    work = Path(tempfile.mkdtemp(prefix="kb-pgbouncer-"))
    port = _free_port()
    _write_config(work, upstream, port, pool_size, max_prepared_statements)
    argv = [binary, str(work / "pgbouncer.ini")]
    if run_as is not None:
        argv[1:1] = ["-u", run_as.pw_name]
        for path in (work, *work.iterdir()):
            os.chown(path, run_as.pw_uid, run_as.pw_gid)
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    bouncer = PgBouncer(proc, work, port, upstream.user, found, max_prepared_statements)
    try:
        _wait_accepting(bouncer)
    except BaseException:
        tail = bouncer.log_tail()
        bouncer.stop()
        raise PgBouncerError(f"pgbouncer did not start:\n{tail}") from None
    return bouncer


def _run_as(upstream: Upstream) -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    if upstream.host.startswith("/"):
        owner = pwd.getpwuid(Path(upstream.host).stat().st_uid)
        if owner.pw_uid != 0:
            return owner
    return pwd.getpwnam("nobody")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _write_config(work: Path, upstream: Upstream, port: int, pool_size: int, prepared: int) -> None:
    def quoted(text: str) -> str:
        return '"' + text.replace('"', '""') + '"'

    # Server logins use the auth file's password; clients are trusted (loopback only).
    (work / "users.txt").write_text(f"{quoted(upstream.user)} {quoted(upstream.password)}\n")
    lines = [
        "[databases]",
        f"* = host={upstream.host} port={upstream.port}",
        "[pgbouncer]",
        "listen_addr = 127.0.0.1",
        f"listen_port = {port}",
        "unix_socket_dir =",
        "auth_type = trust",
        f"auth_file = {work / 'users.txt'}",
        "pool_mode = transaction",
        f"default_pool_size = {pool_size}",
        "max_client_conn = 1000",
        f"logfile = {work / 'pgbouncer.log'}",
        "log_connections = 0",
        "log_disconnections = 0",
        # asyncpg sends none of these today; other drivers do, and PgBouncer would refuse them.
        "ignore_startup_parameters = extra_float_digits,options",
    ]
    if prepared:
        lines.append(f"max_prepared_statements = {prepared}")
    (work / "pgbouncer.ini").write_text("\n".join(lines) + "\n")


def _wait_accepting(bouncer: PgBouncer) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if bouncer.proc.poll() is not None:
            raise PgBouncerError(f"pgbouncer exited with {bouncer.proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", bouncer.port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.05)
    raise PgBouncerError(f"pgbouncer did not listen within {START_TIMEOUT:.0f}s")
