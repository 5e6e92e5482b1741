"""Budget periods: UTC days and calendar months (month bounds are cached by day, so edges matter)."""

from __future__ import annotations

import datetime as dt

import pytest

from services.metering import periods


def _us(*args) -> int:
    return periods.from_datetime(dt.datetime(*args, tzinfo=dt.UTC))


@pytest.mark.parametrize(
    "moment, start, end",
    [
        ((2026, 1, 31, 23, 59, 59, 999999), (2026, 1, 1), (2026, 2, 1)),
        ((2026, 2, 1), (2026, 2, 1), (2026, 3, 1)),
        ((2024, 2, 29, 12), (2024, 2, 1), (2024, 3, 1)),
        ((2025, 12, 31, 23), (2025, 12, 1), (2026, 1, 1)),
    ],
)
def test_month_bounds_at_the_edges(moment, start, end):
    """The calendar month holding a moment, the same on repeated (cached) calls."""
    for _ in range(2):
        assert periods.bounds(periods.MONTH, _us(*moment)) == (_us(*start), _us(*end))


def test_day_bounds():
    """The UTC day holding a moment."""
    assert periods.bounds(periods.DAY, _us(2026, 3, 10, 23, 59)) == (_us(2026, 3, 10), _us(2026, 3, 11))
    with pytest.raises(ValueError):
        periods.bounds("week", 0)
