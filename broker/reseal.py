"""Key-encryption key rotation: re-seal stored secrets under the newest KEK, online, in batches,
and the startup check that the configured KEKs open what the database holds.

Rotating a KEK: (1) deploy every replica with `OLD:…,NEW:…` (the last entry seals new secrets,
the others still open old rows); (2) run `keybroker keys reseal`; (3) drop OLD from the setting.
The startup check refuses step 3 while any row still needs OLD, and refuses a wrong key under a
known id, so a bad setting fails loudly at startup instead of at the first GetKey.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from broker import crypto
from broker.clock import Clock, system_clock
from broker.config import ConfigError
from broker.db import Database
from broker.storage import reseal_store
from broker.storage.audit_writes import AuditEvent
from broker.storage.reseal_store import Resealed, SealedRow

log = logging.getLogger("keybroker.reseal")

RESEAL_ACTION = "keys.resealed"


@dataclass
class ResealReport:
    """What a reseal pass did, counted by the KEK id the rows were sealed under before."""

    sealing_kek_id: str
    resealed: Counter[str] = field(default_factory=Counter)
    # Rows changed by someone else between read and write (left as they are, never overwritten).
    changed_concurrently: Counter[str] = field(default_factory=Counter)
    # Rows that do not open with their KEK (missing from the ring, wrong key, or damaged).
    unreadable: Counter[str] = field(default_factory=Counter)
    batches: int = 0

    @property
    def total_resealed(self) -> int:
        return sum(self.resealed.values())

    @property
    def ok(self) -> bool:
        return not self.unreadable

    def as_dict(self) -> dict[str, object]:
        return {
            "sealing_kek_id": self.sealing_kek_id,
            "resealed": dict(self.resealed),
            "changed_concurrently": dict(self.changed_concurrently),
            "unreadable": dict(self.unreadable),
            "batches": self.batches,
        }


async def reseal_all(
    db: Database, ring: crypto.KeyRing, actor: str, batch_size: int = 100, *, clock: Clock = system_clock
) -> ResealReport:
    """Re-seal every api_keys row not sealed under the ring's sealing KEK.

    Each batch is read, re-encrypted here, and written in its own short transaction with one
    audit row; each write is guarded by the old kek_id and sealed bytes, so a row changed in the
    meantime is skipped, never overwritten. The broker keeps serving throughout: a replica whose
    ring holds both KEKs opens a row before and after its re-seal.
    """
    if batch_size < 1:
        raise ValueError("batch size must be at least 1")
    report = ResealReport(ring.sealing_id)
    after = ("", 0)
    while batch := await reseal_store.rows_to_reseal(db, ring.sealing_id, after, batch_size):
        after = (batch[-1].user_id, batch[-1].key_version)
        resealed = [item for item in (_reseal_row(ring, row, report) for row in batch) if item]
        if resealed:
            await _write_batch(db, resealed, actor, clock, report)
    log.info(
        "resealed %d stored key(s) under %r in %d batch(es); changed concurrently: %d, unreadable: %d",
        report.total_resealed,
        ring.sealing_id,
        report.batches,
        sum(report.changed_concurrently.values()),
        sum(report.unreadable.values()),
    )
    return report


def _reseal_row(ring: crypto.KeyRing, row: SealedRow, report: ResealReport) -> Resealed | None:
    identity = crypto.key_row_identity(row.user_id, row.key_version, row.key_id)
    try:
        kek_id, sealed = crypto.reseal(ring, row.kek_id, row.sealed, identity)
    except crypto.SealError as exc:
        log.error(
            "key %s v%d of user %s cannot be resealed: %s", row.key_id, row.key_version, row.user_id, exc
        )
        report.unreadable[row.kek_id] += 1
        return None
    return Resealed(row, kek_id, sealed)


async def _write_batch(
    db: Database, batch: list[Resealed], actor: str, clock: Clock, report: ResealReport
) -> None:
    def audit_for(written: set[tuple[str, int]]) -> AuditEvent:
        by_kek = Counter(item.row.kek_id for item in batch if _row_key(item) in written)
        details = {
            "kek_id": batch[0].kek_id,
            "resealed": dict(by_kek),
            "changed_concurrently": len(batch) - len(written),
        }
        return AuditEvent("", actor, RESEAL_ACTION, details)

    written = await reseal_store.write_resealed(db, batch, audit_for, clock())
    for item in batch:
        counter = report.resealed if _row_key(item) in written else report.changed_concurrently
        counter[item.row.kek_id] += 1
    report.batches += 1


def _row_key(item: Resealed) -> tuple[str, int]:
    return (item.row.user_id, item.row.key_version)


async def verify_master_key(db: Database, ring: crypto.KeyRing) -> None:
    """Every KEK id the database uses is in the ring and opens a sampled row; else ConfigError.

    Messages name key ids and row counts, never key material.
    """
    for found in await reseal_store.kek_samples(db):
        if found.kek_id not in ring.keys:
            raise ConfigError(
                f"KEYBROKER_MASTER_KEY has no key with id {found.kek_id!r}, but {found.rows} stored "
                f"key(s) are sealed under it (configured ids: {', '.join(ring.keys)}); put it back "
                "(a key can be removed only after `keybroker keys reseal` has moved every row off it)"
            )
        row = found.sample
        identity = crypto.key_row_identity(row.user_id, row.key_version, row.key_id)
        try:
            crypto.open_sealed(ring, row.kek_id, row.sealed, identity)
        except crypto.SealError:
            raise ConfigError(
                f"KEYBROKER_MASTER_KEY: key id {found.kek_id!r} does not open the stored keys sealed "
                f"under {found.kek_id!r} (wrong key for this id)"
            ) from None
