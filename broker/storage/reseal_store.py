"""SQL of key-encryption key rotation: batches of sealed rows, guarded re-seal writes, samples."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from broker.db import Database
from broker.storage.audit_writes import AuditEvent, insert_audit


@dataclass(frozen=True)
class SealedRow:
    """One api_keys row's sealed secret and the identity it is bound to."""

    user_id: str
    key_version: int
    key_id: str
    kek_id: str
    sealed: bytes


@dataclass(frozen=True)
class Resealed:
    """A new sealing for `row`, to be written only if the row still holds `row.sealed`."""

    row: SealedRow
    kek_id: str
    sealed: bytes


@dataclass(frozen=True)
class KekSample:
    kek_id: str
    rows: int
    sample: SealedRow


_COLUMNS = "user_id, key_version, key_id, kek_id, sealed_secret AS sealed"


async def rows_to_reseal(
    db: Database, sealing_id: str, after: tuple[str, int], limit: int
) -> list[SealedRow]:
    """The next rows (in primary key order, after `after`) not sealed under `sealing_id`."""
    rows = await db.fetch(
        f"""SELECT {_COLUMNS} FROM api_keys
            WHERE kek_id <> $1 AND (user_id, key_version) > ($2, $3)
            ORDER BY user_id, key_version LIMIT $4""",  # noqa: S608 - constant column list
        sealing_id,
        after[0],
        after[1],
        limit,
    )
    return [SealedRow(**dict(row)) for row in rows]


async def write_resealed(
    db: Database,
    batch: Sequence[Resealed],
    audit_for: Callable[[set[tuple[str, int]]], AuditEvent],
    now: datetime,
) -> set[tuple[str, int]]:
    """Write a batch in one short transaction; a row changed since it was read is left alone.

    Returns the (user_id, key_version) of the rows written; `audit_for(written)` is appended to
    the audit chain in the same transaction. A deadlock with another writer retries the batch.
    """

    async def write(conn: asyncpg.Connection) -> set[tuple[str, int]]:
        async with conn.transaction():
            rows = await conn.fetch(
                """UPDATE api_keys k SET sealed_secret = v.new_sealed, kek_id = v.new_kek
                   FROM unnest($1::text[], $2::bigint[], $3::text[], $4::bytea[], $5::text[], $6::bytea[])
                        AS v(user_id, key_version, old_kek, old_sealed, new_kek, new_sealed)
                   WHERE k.user_id = v.user_id AND k.key_version = v.key_version
                     AND k.kek_id = v.old_kek AND k.sealed_secret = v.old_sealed
                   RETURNING k.user_id, k.key_version""",
                [item.row.user_id for item in batch],
                [item.row.key_version for item in batch],
                [item.row.kek_id for item in batch],
                [item.row.sealed for item in batch],
                [item.kek_id for item in batch],
                [item.sealed for item in batch],
            )
            written = {(row["user_id"], row["key_version"]) for row in rows}
            await insert_audit(conn, audit_for(written), now)
        return written

    return await db.retrying(write)


async def kek_samples(db: Database) -> list[KekSample]:
    """Every kek_id in use, with its row count and one row sealed under it."""
    rows = await db.fetch(
        """WITH ids AS (SELECT kek_id, count(*) AS rows FROM api_keys GROUP BY kek_id)
           SELECT ids.kek_id, ids.rows, s.user_id, s.key_version, s.key_id, s.sealed_secret
           FROM ids CROSS JOIN LATERAL (
               SELECT user_id, key_version, key_id, sealed_secret FROM api_keys k
               WHERE k.kek_id = ids.kek_id LIMIT 1
           ) s
           ORDER BY ids.kek_id"""
    )
    return [
        KekSample(
            row["kek_id"],
            row["rows"],
            SealedRow(row["user_id"], row["key_version"], row["key_id"], row["kek_id"], row["sealed_secret"]),
        )
        for row in rows
    ]
