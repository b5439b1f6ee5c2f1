"""Tamper-evident audit: recompute every per-user hash chain and name the first broken row.

kb_audit (sql/0003) appends row n of a user's chain with
    row_hash = sha256(prev_hash || content),  prev_hash = row_hash of row n-1 (32 zero bytes for n=1),
    content  = utf8(user_id | seq | event_time in epoch microseconds | actor | action | details::text)
and keeps the chain's last (seq, row_hash) in audit_heads. Editing, deleting or inserting a row,
or rewriting its hash, breaks a link, the row's own hash, or the head; "first" is in the order
the database sorts (user_id, seq), the same order every run.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from broker.db import Database
from broker.storage import audit_store
from broker.storage.audit_store import AuditLink, AuditSnapshot

GENESIS_HASH = bytes(32)
BATCH_SIZE = 1000


@dataclass(frozen=True)
class BrokenRow:
    user_id: str  # '' is the chain of events about no user (tokens, reseals)
    seq: int
    problem: str

    def __str__(self) -> str:
        return f"user {self.user_id!r} seq {self.seq}: {self.problem}"


@dataclass(frozen=True)
class VerifyResult:
    rows: int  # rows checked (when broken: those checked before the walk stopped)
    chains: int
    broken: BrokenRow | None = None

    @property
    def ok(self) -> bool:
        return self.broken is None


def row_hash(link: AuditLink) -> bytes:
    """What kb_audit stored as the row's hash, recomputed from the row as it is now."""
    content = "|".join(
        (link.user_id, str(link.seq), str(link.epoch_micros), link.actor, link.action, link.details)
    )
    return hashlib.sha256(link.prev_hash + content.encode("utf-8")).digest()


def check_link(link: AuditLink, expected_seq: int, expected_prev: bytes) -> BrokenRow | None:
    """The row's own faults, given the row before it in the chain."""
    if link.seq != expected_seq:
        if link.seq > expected_seq:
            return BrokenRow(link.user_id, expected_seq, f"row is missing (the next row has seq {link.seq})")
        return BrokenRow(link.user_id, link.seq, f"unexpected seq (expected {expected_seq})")
    if link.prev_hash != expected_prev:
        where = "the genesis hash" if expected_seq == 1 else f"the row_hash of seq {expected_seq - 1}"
        return BrokenRow(link.user_id, link.seq, f"prev_hash is not {where}")
    if row_hash(link) != link.row_hash:
        return BrokenRow(link.user_id, link.seq, "row_hash does not match the row's content")
    return None


def check_head(
    user_id: str, last_seq: int, last_hash: bytes, head: audit_store.ChainHead | None
) -> BrokenRow | None:
    """A chain's last row against audit_heads (catches rows cut off or appended at the end)."""
    if head is None:
        return BrokenRow(user_id, last_seq, "the chain has no audit_heads row")
    if head.seq > last_seq:
        return BrokenRow(
            user_id, last_seq + 1, f"row is missing (audit_heads says the chain ends at seq {head.seq})"
        )
    if head.seq < last_seq:
        return BrokenRow(
            user_id, head.seq + 1, f"row is past the chain's end in audit_heads (seq {head.seq})"
        )
    if head.row_hash != last_hash:
        return BrokenRow(user_id, last_seq, "row_hash differs from the one in audit_heads")
    return None


async def verify_chain(db: Database, batch_size: int = BATCH_SIZE) -> VerifyResult:
    """Check every chain, streaming rows in batches from one consistent snapshot."""
    async with audit_store.snapshot(db) as snapshot:
        return await _ChainWalk(snapshot, batch_size).run()


class _ChainWalk:
    def __init__(self, snapshot: AuditSnapshot, batch_size: int) -> None:
        self.snapshot = snapshot
        self.batch_size = batch_size
        self.rows = 0
        self.chains = 0
        self.user_id: str | None = None
        self.expected_seq = 1
        self.prev = GENESIS_HASH
        # Ends of finished chains whose heads are not checked yet: (user_id, last seq, last hash).
        self.pending: list[tuple[str, int, bytes]] = []

    async def run(self) -> VerifyResult:
        after = ("", 0)
        while links := await self.snapshot.links(after, self.batch_size):
            after = (links[-1].user_id, links[-1].seq)
            for link in links:
                broken = await self._step(link)
                if broken is not None:
                    return await self._result(broken)
        self._end_chain()
        return await self._result(await self._check_pending())

    async def _step(self, link: AuditLink) -> BrokenRow | None:
        if link.user_id != self.user_id:
            self._end_chain()
            self.user_id, self.expected_seq, self.prev = link.user_id, 1, GENESIS_HASH
            self.chains += 1
            if len(self.pending) >= self.batch_size:
                broken = await self._check_pending()
                if broken is not None:
                    return broken
        broken = check_link(link, self.expected_seq, self.prev)
        if broken is not None:
            # A break in an earlier chain's head comes first.
            return await self._check_pending() or broken
        self.rows += 1
        self.expected_seq, self.prev = link.seq + 1, link.row_hash
        return None

    def _end_chain(self) -> None:
        if self.user_id is not None:
            self.pending.append((self.user_id, self.expected_seq - 1, self.prev))
            self.user_id = None

    async def _check_pending(self) -> BrokenRow | None:
        ends, self.pending = self.pending, []
        heads = await self.snapshot.heads([user_id for user_id, _, _ in ends])
        for user_id, last_seq, last_hash in ends:
            broken = check_head(user_id, last_seq, last_hash, heads.get(user_id))
            if broken is not None:
                return broken
        return None

    async def _result(self, broken: BrokenRow | None) -> VerifyResult:
        """A head whose whole chain is gone counts too, when it sorts before `broken`."""
        before = None if broken is None else broken.user_id
        orphan = await self.snapshot.first_head_without_rows(before, GENESIS_HASH)
        if orphan is not None:
            broken = BrokenRow(
                orphan.user_id, 1, f"row is missing (audit_heads says the chain ends at seq {orphan.seq})"
            )
        return VerifyResult(self.rows, self.chains, broken)
