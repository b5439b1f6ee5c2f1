"""SQL of usage alerts (the outbox written by kb_record_usage), their delivery, anomaly detection
over the hourly roll-up, and pruning of old rate-limit windows."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal

from broker.db import Database

_COLUMNS = """a.user_id, a.alert_id, a.kind, a.period_start, a.dedup_key, a.threshold_percent,
    a.spent_usd, a.reference_usd, a.create_time, a.deliver_time, a.attempts, a.last_error"""


@dataclass(frozen=True)
class AlertRow:
    user_id: str
    alert_id: uuid.UUID
    kind: str  # THRESHOLD | ANOMALY
    period_start: date
    dedup_key: str  # 'threshold:80', 'anomaly:2026-11-27T10'
    threshold_percent: int | None
    spent_usd: Decimal
    reference_usd: Decimal | None
    create_time: datetime
    deliver_time: datetime | None
    attempts: int
    last_error: str | None


@dataclass(frozen=True)
class DueAlert:
    alert: AlertRow
    delivered_to: frozenset[str]  # webhook ids that already took it


@dataclass(frozen=True)
class AlertFilter:
    user_id: str | None = None
    kind: str | None = None  # THRESHOLD | ANOMALY | None (all)
    undelivered_only: bool = False


async def claim_due(db: Database, now: datetime, claim_until: datetime, limit: int) -> list[DueAlert]:
    """Take up to `limit` undelivered alerts whose next attempt has come, pushing their next attempt
    to `claim_until` so a concurrent dispatcher skips them; a crashed dispatcher's claims simply
    come due again."""
    rows = await db.fetch(
        f"""WITH due AS (
                SELECT user_id, alert_id FROM alerts
                WHERE deliver_time IS NULL AND next_attempt_time <= $1
                ORDER BY next_attempt_time
                LIMIT $3
                FOR UPDATE SKIP LOCKED)
            UPDATE alerts a SET next_attempt_time = $2
            FROM due WHERE a.user_id = due.user_id AND a.alert_id = due.alert_id
            RETURNING {_COLUMNS},
                ARRAY(SELECT d.webhook_id FROM alert_deliveries d
                      WHERE d.user_id = a.user_id AND d.alert_id = a.alert_id) AS delivered_to""",  # noqa: S608 - constant columns
        now,
        claim_until,
        limit,
    )
    due = []
    for row in rows:
        values = dict(row)
        delivered_to = frozenset(values.pop("delivered_to"))
        due.append(DueAlert(AlertRow(**values), delivered_to))
    return due


async def finish_attempt(
    db: Database,
    alert: AlertRow,
    now: datetime,
    new_deliveries: list[str],
    delivered: bool,
    error: str | None,
    next_attempt: datetime,
) -> None:
    """Record one delivery attempt: the webhooks that took the alert, then either its delivery time
    (every webhook has it) or the error and the time of the next attempt."""
    async with db.transaction() as conn:
        await conn.execute(
            """INSERT INTO alert_deliveries (user_id, alert_id, webhook_id, delivered_time)
               SELECT $1, $2, w, $3 FROM unnest($4::text[]) w
               ON CONFLICT DO NOTHING""",
            alert.user_id,
            alert.alert_id,
            now,
            new_deliveries,
        )
        await conn.execute(
            """UPDATE alerts SET attempts = attempts + 1,
                   deliver_time = CASE WHEN $3 THEN $4::timestamptz END,
                   last_error = coalesce($5, last_error),
                   next_attempt_time = $6
               WHERE user_id = $1 AND alert_id = $2 AND deliver_time IS NULL""",
            alert.user_id,
            alert.alert_id,
            delivered,
            now,
            error,
            next_attempt,
        )


async def delivery_count(db: Database, user_id: str, alert_id: uuid.UUID) -> int:
    count: int = await db.fetchval(
        "SELECT count(*) FROM alert_deliveries WHERE user_id = $1 AND alert_id = $2", user_id, alert_id
    )
    return count


async def list_alerts(
    db: Database, where: AlertFilter, before: tuple[datetime, str, uuid.UUID] | None, limit: int
) -> list[AlertRow]:
    """Newest first, keyset-paged by (create_time, user_id, alert_id) strictly before `before`."""
    rows = await db.fetch(
        f"""SELECT {_COLUMNS} FROM alerts a
            WHERE ($1::text IS NULL OR a.user_id = $1)
              AND ($2::text IS NULL OR a.kind = $2)
              AND (NOT $3 OR a.deliver_time IS NULL)
              AND ($4::timestamptz IS NULL
                   OR (a.create_time, a.user_id, a.alert_id) < ($4, $5::text, $6::uuid))
            ORDER BY a.create_time DESC, a.user_id DESC, a.alert_id DESC
            LIMIT $7""",  # noqa: S608 - constant columns
        where.user_id,
        where.kind,
        where.undelivered_only,
        before[0] if before else None,
        before[1] if before else None,
        before[2] if before else None,
        limit,
    )
    return [AlertRow(**dict(row)) for row in rows]


async def insert_anomalies(
    db: Database,
    hour: datetime,
    now: datetime,
    factor: Decimal,
    floor_usd: Decimal,
    window: timedelta,
) -> list[AlertRow]:
    """ANOMALY alerts for users whose spend in `hour` is above `factor` x their average hourly spend
    over the `window` before it (hours without spend count as zero) and above `floor_usd`. The
    dedup key makes it once per (user, hour), whichever replica or run finds it first."""
    hours = Decimal(int(window.total_seconds() // 3600))
    rows = await db.fetch(
        f"""WITH current AS (
                SELECT h.user_id, h.cost_usd,
                       round(coalesce((SELECT sum(p.cost_usd) FROM usage_hourly p
                                       WHERE p.user_id = h.user_id
                                         AND p.hour >= $1::timestamptz - $5::interval
                                         AND p.hour < $1), 0) / $6, 10) AS average_usd
                FROM usage_hourly h
                WHERE h.hour = $1 AND h.cost_usd > $4)
            INSERT INTO alerts AS a (user_id, alert_id, kind, period_start, dedup_key, spent_usd,
                                     reference_usd, create_time, next_attempt_time)
            SELECT c.user_id, gen_random_uuid(), 'ANOMALY',
                   date_trunc('month', $1 AT TIME ZONE 'UTC')::date,
                   'anomaly:' || to_char($1 AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24'),
                   c.cost_usd, c.average_usd, $2, $2
            FROM current c
            WHERE c.cost_usd > $3 * c.average_usd
            ON CONFLICT DO NOTHING
            RETURNING {_COLUMNS}""",  # noqa: S608 - constant columns
        hour,
        now,
        factor,
        floor_usd,
        window,
        hours,
    )
    return [AlertRow(**dict(row)) for row in rows]


async def prune_rate_windows(db: Database, before: datetime) -> int:
    """Delete per-minute rate windows that started before `before`; returns how many."""
    status = await db.execute("DELETE FROM rate_windows WHERE window_start < $1", before)
    return int(status.split()[-1])


async def count_undelivered(db: Database) -> int:
    return int(await db.fetchval("SELECT count(*) FROM alerts WHERE deliver_time IS NULL"))
