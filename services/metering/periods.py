"""Time as epoch microseconds (portable across SQLite and Postgres) and budget/chargeback periods."""

from __future__ import annotations

import datetime as dt
import functools
import time

US_PER_SECOND = 1_000_000
US_PER_HOUR = 3600 * US_PER_SECOND
US_PER_DAY = 24 * US_PER_HOUR

DAY = "day"
MONTH = "month"


def now_us() -> int:
    """The current time in epoch microseconds."""
    return time.time_ns() // 1000


def to_datetime(us: int) -> dt.datetime:
    """Epoch microseconds as an aware UTC datetime."""
    return dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=us)


def from_datetime(value: dt.datetime) -> int:
    """An aware datetime as epoch microseconds."""
    delta = value - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return (delta.days * 86400 + delta.seconds) * US_PER_SECOND + delta.microseconds


def bounds(period: str, at_us: int) -> tuple[int, int]:
    """Start (inclusive) and end (exclusive) of the UTC day or calendar month holding at_us."""
    if period == DAY:
        start = at_us - at_us % US_PER_DAY
        return start, start + US_PER_DAY
    if period != MONTH:
        raise ValueError(f"unknown period {period!r}")
    return _month_bounds(at_us // US_PER_DAY)


@functools.lru_cache(maxsize=64)
def _month_bounds(day: int) -> tuple[int, int]:
    # Cached by UTC day number: every hold asks for its month, and the datetime arithmetic costs
    # more than the rest of placing it in Python.
    moment = to_datetime(day * US_PER_DAY)
    first = dt.datetime(moment.year, moment.month, 1, tzinfo=dt.UTC)
    following = dt.datetime(moment.year + moment.month // 12, moment.month % 12 + 1, 1, tzinfo=dt.UTC)
    return from_datetime(first), from_datetime(following)
