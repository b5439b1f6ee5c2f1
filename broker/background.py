"""Periodic background work, each task led by exactly one replica at a time (a lease row).

Tasks: retire provider keys whose grace ended, release expired reservations, roll back dead key
creations, reconcile with OpenRouter, scheduled rotation, deliver usage alerts, detect unusual
spend, and prune old rate-limit windows. Every run is idempotent, so a failed run only delays the
next one, and a new leader simply carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

from broker.alerts import AlertJobs
from broker.config import Settings
from broker.errors import KeybrokerError
from broker.keys import KeyService
from broker.leases import Leases
from broker.ledger import Ledger
from broker.reconcile import Reconciler
from broker.scheduled_rotation import rotate_older_than

log = logging.getLogger("keybroker.background")
MIN_LEASE = timedelta(seconds=5)


@dataclass(frozen=True)
class Task:
    name: str
    interval: timedelta
    run: Callable[[], Awaitable[object]]


def broker_tasks(
    settings: Settings,
    keys: KeyService,
    ledger: Ledger,
    reconciler: Reconciler,
    alerts: AlertJobs | None = None,
) -> list[Task]:
    every = settings.background_interval
    tasks = [
        Task("retire-keys", every, keys.retire_due),
        Task("expire-reservations", every, ledger.release_expired),
        Task("roll-back-intents", max(every, settings.intent_timeout / 4), keys.minter.roll_back_stale),
    ]
    if settings.reconcile_interval > timedelta(0):
        tasks.append(Task("reconcile", settings.reconcile_interval, reconciler.run))
    rotate_after = settings.rotate_after
    if rotate_after is not None:

        async def rotate_due() -> object:
            return await rotate_older_than(
                keys, rotate_after, settings.rotate_grace, False, "scheduled-rotation"
            )

        tasks.append(Task("rotate-due", max(every, timedelta(seconds=30)), rotate_due))
    if alerts is not None:
        slow = max(every, settings.anomaly_interval)
        tasks += [
            Task("dispatch-alerts", every, alerts.dispatcher.dispatch_due),
            Task("detect-anomalies", slow, alerts.detector.detect),
            Task("prune-rate-windows", slow, alerts.pruner.prune),
        ]
    return tasks


class BackgroundTasks:
    def __init__(
        self,
        tasks: list[Task],
        leases: Leases,
        observe: Callable[[str, bool], None] | None = None,
    ) -> None:
        self.tasks = tasks
        self.leases = leases
        # Told of every run on this replica: (task name, failed). The metrics use it.
        self.observe = observe
        self.runs: Counter[str] = Counter()
        self._running: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for task in self.tasks:
            self._running.append(asyncio.create_task(self._loop(task), name=f"keybroker-{task.name}"))

    async def stop(self) -> None:
        for running in self._running:
            running.cancel()
        for running in self._running:
            with contextlib.suppress(asyncio.CancelledError):
                await running
        self._running.clear()
        for task in self.tasks:  # let another replica take over at once
            with contextlib.suppress(KeybrokerError):
                await self.leases.release(task.name)

    async def run_once(self, task: Task) -> bool:
        """Run `task` if this replica holds (or can take) its lease; True if it ran."""
        if not await self.leases.hold(task.name, max(task.interval * 3, MIN_LEASE)):
            return False
        await task.run()
        self.runs[task.name] += 1
        return True

    async def _loop(self, task: Task) -> None:
        while True:
            failed = True
            try:
                ran = await self.run_once(task)
                failed = False
            except KeybrokerError as exc:
                log.warning("background %s failed: %s (%s)", task.name, exc.message, exc.reason)
            except Exception:
                log.exception("background %s failed", task.name)
            if self.observe is not None and (failed or ran):
                self.observe(task.name, failed)
            await asyncio.sleep(task.interval.total_seconds())
