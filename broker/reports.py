"""Cost reports for operators: one UTC day per (user, model), one month per user against the limit.

Both read the roll-ups kept in the RecordUsage transaction (see storage/reports_store.py), never
the ledger: their cost grows with the roll-up rows of the period (users x models x agents per day),
not with the ledger's size. Money stays Decimal throughout. The percentage of the limit used
is computed on the exact quotient and rounded to two decimals with ROUND_HALF_EVEN (banker's
rounding: 12.345 -> "12.34", 12.355 -> "12.36"); it is None when undefined (no limit, or a limit of
zero).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, date
from decimal import Decimal, InvalidOperation

from broker.clock import Clock, month_label, period_end, period_start
from broker.db import Database
from broker.errors import InvalidArgument
from broker.paging import decode_token, encode_token, rows_to_read, split_page
from broker.storage import reports_store
from broker.storage.reports_store import DailyAfter, DailyRow, MonthlyAfter, MonthlyRow
from broker.validation import USER_ID

__all__ = [
    "TOP_MODELS",
    "CostReports",
    "DailyReport",
    "DailyRow",
    "MonthlyReport",
    "MonthlyRow",
    "UserDayTotals",
    "percent_used",
    "user_day_totals",
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
    rows: list[DailyRow]  # per (user, model), highest cost first: the whole day or one page
    total_cost_usd: Decimal  # the whole day
    next_page_token: str = ""  # "" on the last page


@dataclass(frozen=True)
class MonthlyReport:
    month: date  # first day of the month
    rows: list[MonthlyRow]  # per user with usage, highest spend first: the whole month or one page
    total_cost_usd: Decimal  # the whole month
    next_page_token: str = ""  # "" on the last page


def user_day_totals(rows: list[DailyRow]) -> list[UserDayTotals]:
    """Per user over all models, highest cost first (ties by user id)."""
    totals: dict[str, tuple[int, int, Decimal]] = {}
    for row in rows:
        requests, tokens, cost = totals.get(row.user_id, (0, 0, Decimal(0)))
        totals[row.user_id] = (requests + row.requests, tokens + row.tokens, cost + row.cost_usd)
    users = [UserDayTotals(user, *values) for user, values in totals.items()]
    return sorted(users, key=lambda u: (-u.cost_usd, u.user_id))


class CostReports:
    def __init__(self, db: Database, clock: Clock) -> None:
        self.db = db
        self.clock = clock

    async def daily(self, day: date | None = None, page_size: int = 0, page_token: str = "") -> DailyReport:
        """One UTC day (default: today by the clock); one page of `page_size` rows, or all for 0."""
        day = day or self.clock().astimezone(UTC).date()
        label = day.isoformat()
        after = decode_page_token(page_token, "daily", label)
        assert after is None or isinstance(after, DailyAfter)
        rows, total = await reports_store.daily_rows(self.db, day, after, rows_to_read(page_size))
        rows, last = split_page(rows, page_size)
        token = ""
        if last is not None:
            token = encode_page_token("daily", label, last.cost_usd, last.user_id, last.model)
        return DailyReport(day, rows, total, token)

    async def monthly(
        self, month: date | None = None, page_size: int = 0, page_token: str = ""
    ) -> MonthlyReport:
        """One calendar month (default: this month by the clock), `month` its first day; one page
        of `page_size` rows, or all for 0."""
        month = month or period_start(self.clock())
        label = month_label(month)
        after = decode_page_token(page_token, "monthly", label)
        assert after is None or isinstance(after, MonthlyAfter)
        next_month = period_end(month).date()
        rows, total = await reports_store.monthly_rows(
            self.db, month, next_month, TOP_MODELS, after, rows_to_read(page_size)
        )
        rows, last = split_page(rows, page_size)
        token = "" if last is None else encode_page_token("monthly", label, last.spent_usd, last.user_id)
        return MonthlyReport(month, rows, total, token)


# -- paging -------------------------------------------------------------------------------------


def encode_page_token(kind: str, period: str, cost: Decimal, *keys: str) -> str:
    """An opaque token: the report it belongs to and the sort key of the page's last row."""
    return encode_token(json.dumps([kind, period, str(cost), *keys], separators=(",", ":")))


def decode_page_token(token: str, kind: str, period: str) -> DailyAfter | MonthlyAfter | None:
    """Where the page continues; None for an empty token. INVALID_ARGUMENT (page_token) for a
    token that is not from a previous page of this same report."""
    if not token:
        return None
    try:
        fields = json.loads(decode_token(token))
        if not isinstance(fields, list) or not all(isinstance(f, str) for f in fields):
            raise ValueError("not a list of strings")
        if fields[:2] != [kind, period]:
            raise ValueError("another report")
        cost = Decimal(fields[2])
        if not cost.is_finite() or not USER_ID.fullmatch(fields[3]):
            raise ValueError("not a sort key")
        if kind == "daily" and len(fields) == 5:
            return DailyAfter(cost, fields[3], fields[4])
        if kind == "monthly" and len(fields) == 4:
            return MonthlyAfter(cost, fields[3])
        raise ValueError("wrong length")
    except (ValueError, TypeError, IndexError, InvalidOperation):
        raise InvalidArgument(
            "page_token", "is not a token from a previous page of this report (same kind, date or month)"
        ) from None
