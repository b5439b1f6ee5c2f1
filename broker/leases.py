"""Leadership of background tasks across replicas: a lease row with an expiry per task.

A plain row (not a session-level advisory lock) so that it works behind PgBouncer in transaction
mode. The holder renews the lease on every run; if it dies, another replica takes over once the
lease expires.
"""

from __future__ import annotations

import os
import socket
import uuid
from datetime import timedelta

from broker.clock import Clock
from broker.db import Database
from broker.storage import maintenance_store


class Leases:
    def __init__(self, db: Database, clock: Clock, holder: str | None = None) -> None:
        self.db = db
        self.clock = clock
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    async def hold(self, name: str, ttl: timedelta) -> bool:
        now = self.clock()
        return await maintenance_store.hold_lease(self.db, name, self.holder, now, now + ttl)

    async def release(self, name: str) -> None:
        await maintenance_store.release_lease(self.db, name, self.holder)
