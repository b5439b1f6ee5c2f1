"""Scheduled rotation: replace keys older than a cut-off, each with a grace period."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta

from broker.errors import KeybrokerError
from broker.keys import KeyService
from broker.storage import maintenance_store

log = logging.getLogger("keybroker.rotation")
BATCH = 500


@dataclass
class RotationRun:
    rotated: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (user_id, reason)


async def rotate_older_than(
    keys: KeyService,
    older_than: timedelta,
    grace: timedelta,
    delete_old: bool,
    actor: str,
    dry_run: bool = False,
) -> RotationRun:
    """Rotate every active key created before now - older_than (0: every active key). The
    request id is derived from the key's version, so a re-run after a crash rotates nothing twice."""
    run = RotationRun()
    cut_off = keys.clock() - older_than
    for user_id in await maintenance_store.rotation_candidates(keys.db, cut_off, BATCH):
        if dry_run:
            run.rotated.append(user_id)
            continue
        try:
            current = await keys.info(user_id)
            await keys.rotate(user_id, f"scheduled:v{current.key_version}", grace, delete_old, actor)
            run.rotated.append(user_id)
        except KeybrokerError as exc:
            log.warning("scheduled rotation of %s failed: %s", user_id, exc.reason)
            run.failed.append((user_id, exc.reason))
    return run
