"""The price table: versions stored platform-wide, cached briefly in memory for the hot path."""

from __future__ import annotations

from collections.abc import Callable

from services.metering import periods, store
from services.metering.pricing import MAX_RATE, Price, PriceBook
from shared.cache import TenantCache
from shared.errors import InvalidArgument

MAX_TEXT = 200


def validate_price(price: Price) -> dict[str, str]:
    """Field violations of a price version; empty when it is valid."""
    problems: dict[str, str] = {}
    if not price.model:
        problems["price.model"] = "required"
    elif len(price.model) > MAX_TEXT:
        problems["price.model"] = f"at most {MAX_TEXT} characters"
    if price.effective_us <= 0:
        problems["price.effective_time"] = "required"
    for name in ("input", "output", "cache_write", "cache_read"):
        if not 0 <= getattr(price, name) <= MAX_RATE:
            problems[f"price.{name}_micros_per_mtok"] = f"between 0 and {MAX_RATE:,} ($1,000 per million tokens)"
    return problems


class PriceCache:
    """Reads price versions through a system session, keeping them for max_age_us.

    A replica sees another replica's SetPrice within max_age; its own at once. Concurrent
    readers of a stale table share one reload.
    """

    _PLATFORM = ""  # the price table is platform-wide: one entry, under no tenant

    def __init__(self, db, *, max_age_us: int = 2 * periods.US_PER_SECOND, clock: Callable[[], int] = periods.now_us):
        self._db = db
        self._clock = clock
        self._books: TenantCache[PriceBook] = TenantCache(max_age_us / periods.US_PER_SECOND, max_entries=1)

    async def book(self, *, fresh: bool = False) -> PriceBook:
        """Every price version (reloaded when stale, or always when fresh=True)."""
        if fresh:
            self._books.invalidate(self._PLATFORM)
        return await self._books.load(self._PLATFORM, self._load)

    async def _load(self) -> PriceBook:
        async with self._db.system_session() as s:
            return PriceBook(await store.all_prices(s))

    async def current(self, model: str) -> Price | None:
        """The price in force now for a model."""
        return (await self.book()).price_at(model, self._clock())

    async def set(self, price: Price) -> Price:
        """Store a price version."""
        if problems := validate_price(price):
            raise InvalidArgument("invalid price", reason="INVALID_PRICE", violations=problems)
        async with self._db.system_session() as s:
            await store.upsert_price(s, price)
        self._books.invalidate(self._PLATFORM)
        return price
