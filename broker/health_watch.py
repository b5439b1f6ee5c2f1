"""The gRPC health status follows the database: NOT_SERVING while it cannot be reached, so load
balancers stop sending traffic; SERVING again once it answers. Per replica, not leased."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from broker.db import Database

log = logging.getLogger("keybroker.health")


class DatabaseHealthWatch:
    def __init__(
        self,
        db: Database,
        set_serving: Callable[[bool], Awaitable[None]],
        interval: float = 1.0,
        timeout: float = 2.0,
    ) -> None:
        self.db = db
        self.set_serving = set_serving
        self.interval = interval
        self.timeout = timeout
        self.serving = True
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="keybroker-db-health")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def check(self) -> bool:
        try:
            reachable = await asyncio.wait_for(self.db.ping(), self.timeout)
        except TimeoutError:
            reachable = False
        if reachable != self.serving:
            self.serving = reachable
            await self.set_serving(reachable)
            if reachable:
                log.warning("database reachable again: health SERVING")
            else:
                log.error("database unreachable: health NOT_SERVING until it answers again")
        return reachable

    async def _loop(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(self.interval)
