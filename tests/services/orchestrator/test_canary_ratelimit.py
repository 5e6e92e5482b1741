"""Canary markers and the per-tenant rate limiter."""

from __future__ import annotations

from services.orchestrator.canary import foreign_markers, marker_for
from services.orchestrator.ratelimit import RateLimiter

KEY = b"k" * 32


def test_markers_differ_per_tenant_and_key():
    """Each tenant has its own marker, unguessable without the key."""
    assert marker_for("t_a", KEY) != marker_for("t_b", KEY)
    assert marker_for("t_a", KEY) != marker_for("t_a", b"other")
    assert marker_for("t_a", KEY) == marker_for("t_a", KEY)


def test_foreign_marker_found_own_marker_ignored():
    """Only another tenant's marker counts."""
    own, other = marker_for("t_a", KEY), marker_for("t_b", KEY)
    assert foreign_markers(f"hi {own}", own) == []
    assert foreign_markers(f"leak {other} and {other} {own}", own) == [other]


def test_rate_limiter_per_key_with_refill():
    """A tenant's burst is used up independently of others, then refills with time."""
    now = [0.0]
    rl = RateLimiter(rate=1.0, burst=2, clock=lambda: now[0])
    assert rl.try_acquire("A") is None and rl.try_acquire("A") is None
    wait = rl.try_acquire("A")
    assert wait is not None and 0.9 < wait <= 1.0
    assert rl.try_acquire("B") is None
    now[0] = 1.0
    assert rl.try_acquire("A") is None
