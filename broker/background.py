"""Periodic background work: retire provider keys whose grace ended, release expired
reservations. Each run is independent and idempotent, so a failure only delays the next run."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta

from broker.errors import KeybrokerError
from broker.keys import KeyService
from broker.ledger import Ledger

log = logging.getLogger("keybroker.background")


class BackgroundTasks:
    def __init__(self, keys: KeyService, ledger: Ledger, interval: timedelta) -> None:
        self.keys = keys
        self.ledger = ledger
        self.interval = interval.total_seconds()
        self._task: asyncio.Task[None] | None = None
        self.runs = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="keybroker-background")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def run_once(self) -> None:
        retired = await self.keys.retire_due()
        swept = await self.ledger.release_expired()
        if retired or swept:
            log.info("background: retired %d keys, released expired reservations of %d users", retired, swept)
        self.runs += 1

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_once()
            except KeybrokerError as exc:
                log.warning("background run failed: %s (%s)", exc.message, exc.reason)
            except Exception:
                log.exception("background run failed")
            await asyncio.sleep(self.interval)
