"""What tests ask of a database pool."""

from __future__ import annotations

import asyncio
from typing import Any

from shared.db.kept import HOLD_S


async def until_kept_connections_went_back(pool: Any) -> None:
    """Wait until the connections the raw paths kept (shared.db.kept) went back to the pool, so that nothing is
    checked out: a connection a call leaked, or left in a transaction, fails here."""
    for _ in range(100):
        if pool.checkedout() == 0:
            return
        await asyncio.sleep(HOLD_S)
    raise AssertionError(f"{pool.checkedout()} connections still checked out after the quiet period")
