"""Quota and budget values: what a tenant may use, and what reservations and leases hold (no I/O)."""

from __future__ import annotations

from dataclasses import dataclass

from services.metering import periods
from services.metering.pricing import Tokens

TOKENS = "tokens"
MICRO_USD = "micro_usd"
UNITS = (TOKENS, MICRO_USD)


@dataclass(frozen=True, slots=True)
class BudgetSpec:
    """A limit on one unit per period."""

    unit: str
    """TOKENS or MICRO_USD."""
    limit: int
    """Most that may be used per period."""
    period: str = periods.MONTH
    """periods.DAY or periods.MONTH."""
    hard: bool = True
    """Hard refuses past the limit; soft grants and flags it."""


@dataclass(frozen=True, slots=True)
class Quota:
    """A tenant's rate limits (0 = unlimited) and budgets."""

    tenant_id: str
    """The tenant."""
    requests_per_minute: int = 0
    """Calls per minute (the inference proxy enforces it)."""
    tokens_per_minute: int = 0
    """Tokens per minute (the inference proxy enforces it)."""
    concurrent_calls: int = 0
    """Calls in flight (the inference proxy enforces it)."""
    budgets: tuple[BudgetSpec, ...] = ()
    """At most one per unit."""
    updated_us: int = 0
    """When it was last set."""


@dataclass(frozen=True, slots=True)
class BudgetState:
    """A budget in its current period."""

    spec: BudgetSpec
    """The budget."""
    period_start_us: int
    """Period start."""
    period_end_us: int
    """Period end (exclusive)."""
    used: int
    """Charged."""
    held: int
    """Held by open holds."""

    @property
    def remaining(self) -> int:
        """What may still be held (never negative)."""
        return max(0, self.spec.limit - self.used - self.held)


@dataclass(frozen=True, slots=True)
class Amounts:
    """An amount in each unit."""

    tokens: int = 0
    """Tokens."""
    micro_usd: int = 0
    """Micro-USD."""


@dataclass(frozen=True, slots=True)
class Reservation:
    """A granted reservation."""

    reservation_id: str
    """Its id."""
    held: Amounts
    """What it holds."""
    expires_us: int
    """When it expires unless committed."""
    over_budget: bool = False
    """A soft budget was passed."""


@dataclass(frozen=True, slots=True)
class Settlement:
    """What settling a hold charged and returned."""

    charged: Amounts
    """Moved into used."""
    released: Amounts
    """Returned to the budget."""


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    """A lease's state."""

    lease_id: str
    """Its id."""
    model: str
    """The model it is for."""
    granted: Amounts
    """What it holds."""
    spent: Tokens
    """Spend reported so far."""
    expires_us: int
    """When it expires unless renewed."""
    holder: str = ""
    """Who holds it (the process spending it), as given when it was leased."""
    in_flight_tokens: int = 0
    """Tokens its holder last reported held by calls in flight (charged on expiry, up to the grant)."""


def validate_quota(quota: Quota) -> dict[str, str]:
    """Field violations of a quota; empty when it is valid."""
    problems: dict[str, str] = {}
    for name in ("requests_per_minute", "tokens_per_minute", "concurrent_calls"):
        if getattr(quota, name) < 0:
            problems[f"quota.{name}"] = "cannot be negative (0 means unlimited)"
    seen: set[str] = set()
    for i, spec in enumerate(quota.budgets):
        if spec.unit not in UNITS:
            problems[f"quota.budgets[{i}].unit"] = "required"
        elif spec.unit in seen:
            problems[f"quota.budgets[{i}].unit"] = "one budget per unit"
        seen.add(spec.unit)
        if spec.limit <= 0:
            problems[f"quota.budgets[{i}].limit"] = "must be positive"
    return problems
