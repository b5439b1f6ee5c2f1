"""Cost reports for operators: one UTC day per (user, model), one month per user against the limit.

Both read the roll-ups kept in the RecordUsage transaction (see storage/reports_store.py), never
the ledger: their cost grows with the roll-up rows of the period (users x models x agents per day),
not with the ledger's size. Money stays Decimal throughout. The percentage of the limit used
is computed on the exact quotient and rounded to two decimals with ROUND_HALF_EVEN (banker's
rounding: 12.345 -> "12.34", 12.355 -> "12.36"); it is None when undefined (no limit, or a limit of
zero).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date
from decimal import Decimal

from broker.clock import Clock, period_end, period_start
from broker.db import Database
from broker.storage import reports_store
from broker.storage.reports_store import DailyRow, MonthlyRow

__all__ = [
    "TOP_MODELS",
    "CostReports",
    "DailyReport",
    "DailyRow",
    "MonthlyReport",
    "MonthlyRow",
    "UserDayTotals",
    "percent_used",
]

TOP_MODELS = 3


def percent_used(spent: Decimal, limit: Decimal | None) -> Decimal | None:
    """spent / limit in percent, exactly rounded half-even to two decimals (Decimal("81.25"))."""
    if limit is None or limit == 0:
        return None
    # Exact integer arithmetic (a Decimal division would round at 28 digits before the half-even
    # rounding to hundredths, which can turn a value just above a midpoint into the midpoint).
    spent_num, spent_den = spent.as_integer_ratio()
    limit_num, limit_den = limit.as_integer_ratio()
    numerator, denominator = spent_num * limit_den * 10_000, spent_den * limit_num
    hundredths, remainder = divmod(numerator, denominator)
    if 2 * remainder > denominator or (2 * remainder == denominator and hundredths % 2):
        hundredths += 1
    return Decimal(hundredths).scaleb(-2)


@dataclass(frozen=True)
class UserDayTotals:
    user_id: str
    requests: int
    tokens: int
    cost_usd: Decimal


@dataclass(frozen=True)
class DailyReport:
    day: date
    rows: list[DailyRow]  # per (user, model), highest cost first

    @property
    def total_cost_usd(self) -> Decimal:
        return sum((row.cost_usd for row in self.rows), Decimal(0))

    def user_totals(self) -> list[UserDayTotals]:
        """Per user over all models, highest cost first (ties by user id)."""
        totals: dict[str, tuple[int, int, Decimal]] = {}
        for row in self.rows:
            requests, tokens, cost = totals.get(row.user_id, (0, 0, Decimal(0)))
            totals[row.user_id] = (requests + row.requests, tokens + row.tokens, cost + row.cost_usd)
        users = [UserDayTotals(user, *values) for user, values in totals.items()]
        return sorted(users, key=lambda u: (-u.cost_usd, u.user_id))


@dataclass(frozen=True)
class MonthlyReport:
    month: date  # first day of the month
    rows: list[MonthlyRow]  # per user with usage, highest spend first

    @property
    def total_cost_usd(self) -> Decimal:
        return sum((row.spent_usd for row in self.rows), Decimal(0))


class CostReports:
    def __init__(self, db: Database, clock: Clock) -> None:
        self.db = db
        self.clock = clock

    async def daily(self, day: date | None = None) -> DailyReport:
        """One UTC day (default: today by the clock)."""
        day = day or self.clock().astimezone(UTC).date()
        return DailyReport(day, await reports_store.daily_rows(self.db, day))

    async def monthly(self, month: date | None = None) -> MonthlyReport:
        """One calendar month (default: this month by the clock); `month` is its first day."""
        month = month or period_start(self.clock())
        next_month = period_end(month).date()
        rows = await reports_store.monthly_rows(self.db, month, next_month, TOP_MODELS)
        return MonthlyReport(month, rows)
