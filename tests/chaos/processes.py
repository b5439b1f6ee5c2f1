"""A broker as a real operating-system process, so it can be SIGKILLed and restarted."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def broker_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYBROKER_", "OPENROUTER_"))}
    env.update(settings)
    return env


class BrokerProcess:
    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0

    async def start(self, timeout: float = 60) -> int:
        """Start `keybroker serve`; returns its port once it listens."""
        log = self.log_path.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "broker",
            "serve",
            env=self.env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        self.starts += 1
        assert self.proc.stderr is not None
        stderr = self.proc.stderr

        async def port() -> int:
            while True:
                line = await stderr.readline()
                if not line:
                    raise AssertionError(f"broker exited before listening; see {self.log_path}")
                log.write(line)
                found = re.search(rb"listening on port (\d+)", line)
                if found:
                    return int(found.group(1))

        try:
            return await asyncio.wait_for(port(), timeout)
        finally:
            asyncio.get_running_loop().create_task(self._drain(stderr, log))

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(self.proc.wait(), 30)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()

    @staticmethod
    async def _drain(stream: asyncio.StreamReader, log: object) -> None:
        while line := await stream.readline():
            log.write(line)  # type: ignore[attr-defined]
        log.close()  # type: ignore[attr-defined]
