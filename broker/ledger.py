"""The money rules: limits, reservations, usage recording and summaries.

Every decision that involves concurrent spend is taken inside one SQL statement (see
sql/0002_hot_path_functions.sql); this module validates nothing, converts nothing to floats, and
only turns outcomes into results or domain errors.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal

from broker.clock import Clock, period_end, period_start
from broker.db import Database
from broker.errors import KeyDisabled, NoApiKey, RateLimited
from broker.storage import ledger_store
from broker.storage.ledger_store import GroupTotals, UsageRecord, UsageTotals

__all__ = ["CheckResult", "Ledger", "UsageRecord", "UsageResult", "UsageSummary"]


@dataclass(frozen=True)
class CheckResult:
    allowed: bool
    limit_usd: Decimal | None
    spent_usd: Decimal
    reserved_usd: Decimal
    period_end: datetime
    key_version: int
    reservation_id: uuid.UUID | None
    reservation_expire_time: datetime | None

    @property
    def remaining_usd(self) -> Decimal | None:
        if self.limit_usd is None:
            return None
        return self.limit_usd - self.spent_usd - self.reserved_usd


@dataclass(frozen=True)
class UsageResult:
    duplicate: bool
    spent_usd: Decimal
    remaining_usd: Decimal | None
    over_limit: bool


@dataclass(frozen=True)
class UsageSummary:
    month: date
    totals: UsageTotals
    by_model: list[GroupTotals]
    by_agent: list[GroupTotals]


def seconds_to_next_minute(now: datetime) -> float:
    """When a fixed one-minute rate window ends (RetryInfo of RATE_LIMITED)."""
    return 60.0 - now.second - now.microsecond / 1e6


class Ledger:
    def __init__(
        self,
        db: Database,
        clock: Clock,
        reservation_ttl: timedelta,
        alert_thresholds: tuple[Decimal, ...] = (),
    ) -> None:
        self.db = db
        self.clock = clock
        self.reservation_ttl = reservation_ttl
        self.alert_thresholds = alert_thresholds
        # Told of each newly recorded call (model, cost): the metrics count spend by model.
        self.on_recorded: Callable[[str, Decimal], None] | None = None
        # Told the number of open reservations after each expiry sweep (a metrics gauge).
        self.on_open_reservations: Callable[[int], None] | None = None

    async def check_limit(
        self, user_id: str, estimate: Decimal | None, request_id: str | None
    ) -> CheckResult:
        now = self.clock()
        period = period_start(now)
        row = await ledger_store.check_limit(
            self.db, user_id, estimate, request_id, now, period, now + self.reservation_ttl
        )
        if row.outcome == "no_key":
            raise NoApiKey(user_id)
        if row.outcome == "disabled":
            raise KeyDisabled(user_id)
        if row.outcome == "rate_limited":
            raise RateLimited(user_id, seconds_to_next_minute(now))
        return CheckResult(
            allowed=row.allowed,
            limit_usd=row.limit_usd,
            spent_usd=row.spent_usd,
            reserved_usd=row.reserved_usd,
            period_end=period_end(period),
            key_version=row.key_version,
            reservation_id=row.reservation_id,
            reservation_expire_time=row.reservation_expire_time,
        )

    async def record_usage(self, usage: UsageRecord) -> UsageResult:
        now = self.clock()
        row = await ledger_store.record_usage(self.db, usage, now, period_start(now), self.alert_thresholds)
        if row.outcome == "no_key":
            raise NoApiKey(usage.user_id)
        if not row.duplicate and self.on_recorded is not None:
            self.on_recorded(usage.model, usage.cost_usd)
        return UsageResult(row.duplicate, row.spent_usd, row.remaining_usd, row.over_limit)

    async def release_reservation(self, user_id: str, reservation_id: uuid.UUID) -> tuple[bool, Decimal]:
        now = self.clock()
        return await ledger_store.release_reservation(
            self.db, user_id, reservation_id, now, period_start(now)
        )

    async def release_expired(self) -> int:
        """Background sweep so stale reservations stop showing in listings; returns users swept."""
        now = self.clock()
        swept = await ledger_store.release_all_expired(self.db, now, period_start(now))
        if self.on_open_reservations is not None:
            self.on_open_reservations(await ledger_store.count_open_reservations(self.db, now))
        return swept

    async def usage_summary(self, user_id: str, month: date | None) -> UsageSummary:
        month = month or period_start(self.clock())
        totals, by_model, by_agent = await ledger_store.usage_summary(self.db, user_id, month)
        return UsageSummary(month, totals, by_model, by_agent)

    async def month_totals(self, user_id: str) -> tuple[Decimal, Decimal]:
        """(spent, live reserved) of the current month."""
        now = self.clock()
        return await ledger_store.period_totals(self.db, user_id, period_start(now), now)
