"""Time, injectable: every module asks a Clock for now, so tests can cross a month boundary."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime

Clock = Callable[[], datetime]


def system_clock() -> datetime:
    return datetime.now(UTC)


def period_start(moment: datetime) -> date:
    """The budget period holding `moment`: the first day of its calendar month in UTC."""
    utc = moment.astimezone(UTC)
    return date(utc.year, utc.month, 1)


def period_end(start: date) -> datetime:
    """The first instant after the period that starts on `start` (next month, 00:00 UTC)."""
    if start.month == 12:
        return datetime(start.year + 1, 1, 1, tzinfo=UTC)
    return datetime(start.year, start.month + 1, 1, tzinfo=UTC)


def month_label(start: date) -> str:
    return f"{start.year:04d}-{start.month:02d}"


class FrozenClock:
    """A settable clock for tests and tools."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now
