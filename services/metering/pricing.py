"""Prices per model, versioned by effective time, and the exact cost of token counts."""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from decimal import Decimal

MICROS_PER_USD = 1_000_000
TOKENS_PER_PRICE_UNIT = 1_000_000  # prices are per million tokens
MAX_TOKENS = 1_000_000_000
"""The most tokens one count may say (a call, a hold's spend, a lease): a thousand times the largest
context window, and small enough that a rate times it, summed over four kinds, stays inside BIGINT."""
MAX_RATE = 1_000_000_000
"""The highest price, micro-USD per million tokens ($1,000): with MAX_TOKENS, every cost fits in BIGINT."""


def count_problems(field: str, **counts: int) -> dict[str, str]:
    """Field violations of token counts that are negative or above MAX_TOKENS (empty when all are fine)."""
    problems = {}
    for name, value in counts.items():
        if value < 0:
            problems[f"{field}.{name}" if field else name] = "cannot be negative"
        elif value > MAX_TOKENS:
            problems[f"{field}.{name}" if field else name] = f"at most {MAX_TOKENS:,}"
    return problems


def tokens_problems(tokens: Tokens, field: str) -> dict[str, str]:
    """count_problems for the four kinds of a Tokens value, named as in TokenCounts."""
    return count_problems(
        field,
        input_tokens=tokens.input,
        output_tokens=tokens.output,
        cache_write_tokens=tokens.cache_write,
        cache_read_tokens=tokens.cache_read,
    )


@dataclass(frozen=True, slots=True)
class Tokens:
    """Tokens of one call or a sum of calls, by kind."""

    input: int = 0
    """Input tokens neither written to nor read from the prompt cache."""
    output: int = 0
    """Output tokens."""
    cache_write: int = 0
    """Input tokens written to the prompt cache."""
    cache_read: int = 0
    """Input tokens read from the prompt cache."""

    @property
    def total(self) -> int:
        """Every token of every kind (what token budgets count)."""
        return self.input + self.output + self.cache_write + self.cache_read

    def parts(self) -> tuple[int, int, int, int]:
        """(input, output, cache_write, cache_read)."""
        return self.input, self.output, self.cache_write, self.cache_read

    def __add__(self, other: Tokens) -> Tokens:
        return Tokens(
            self.input + other.input,
            self.output + other.output,
            self.cache_write + other.cache_write,
            self.cache_read + other.cache_read,
        )


@dataclass(frozen=True, slots=True)
class Price:
    """One version of a model's price, in micro-USD per million tokens."""

    model: str
    """The model, with its pinned version."""
    effective_us: int
    """In force from this time (epoch microseconds) until the next version."""
    input: int
    """Input, micro-USD per million tokens."""
    output: int
    """Output, micro-USD per million tokens."""
    cache_write: int
    """Cache write, micro-USD per million tokens."""
    cache_read: int
    """Cache read, micro-USD per million tokens."""

    def cost_scaled(self, tokens: Tokens) -> int:
        """Cost in micro-USD times one million: an integer, so sums stay exact."""
        return (
            tokens.input * self.input
            + tokens.output * self.output
            + tokens.cache_write * self.cache_write
            + tokens.cache_read * self.cache_read
        )

    def cost_micros_ceil(self, tokens: Tokens) -> int:
        """Cost in whole micro-USD, rounded up (what a money budget is charged)."""
        return -(-self.cost_scaled(tokens) // TOKENS_PER_PRICE_UNIT)

    def worst_case_micros(self, prompt_tokens: int, output_tokens: int) -> int:
        """The most a call of this size can cost, whichever way its prompt is cached."""
        prompt_rate = max(self.input, self.cache_write, self.cache_read)
        scaled = prompt_tokens * prompt_rate + output_tokens * self.output
        return -(-scaled // TOKENS_PER_PRICE_UNIT)

    def worst_rate(self) -> int:
        """The highest rate of any token kind (prices a lease of mixed tokens safely)."""
        return max(self.input, self.output, self.cache_write, self.cache_read)


def scaled_to_usd(scaled: int) -> Decimal:
    """Turn a cost_scaled sum into exact USD."""
    return Decimal(scaled) / (MICROS_PER_USD * TOKENS_PER_PRICE_UNIT)


def format_usd(amount: Decimal) -> str:
    """An exact, plain decimal string without exponent or trailing zeros ("0" for nothing)."""
    text = format(amount.normalize(), "f")
    return text if "." not in text else text.rstrip("0").rstrip(".")


class PriceBook:
    """Every price version, answering "what did this model cost at that time?"."""

    def __init__(self, prices: list[Price]):
        self._by_model: dict[str, list[Price]] = {}
        for price in sorted(prices, key=lambda p: (p.model, p.effective_us)):
            self._by_model.setdefault(price.model, []).append(price)
        self._starts = {m: [p.effective_us for p in v] for m, v in self._by_model.items()}

    def price_at(self, model: str, at_us: int) -> Price | None:
        """The version in force at at_us, or None when the model had no price then."""
        starts = self._starts.get(model)
        if not starts:
            return None
        i = bisect.bisect_right(starts, at_us) - 1
        return self._by_model[model][i] if i >= 0 else None

    def versions(self) -> dict[str, list[Price]]:
        """Versions by model, oldest first."""
        return self._by_model
