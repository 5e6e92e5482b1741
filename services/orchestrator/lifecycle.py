"""The orchestrator's part of a tenant purge: stop its runs before their rows go.

Queue entries go first, in their own transaction, so no replica claims (or resumes) one of the
tenant's runs while its rows are being deleted; a run already executing fails at its next step,
since the tenant is suspended and its tokens are refused everywhere.
"""

from __future__ import annotations

from shared.db import Database
from shared.db.raw import raw_transaction
from shared.lifecycle import HookResult
from shared.tiers import Tier


class CancelRuns:
    """PurgeHook: drop the tenant's queue entries and count the unfinished runs that stop."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def before_rows(self, tenant_id: str, tier: Tier) -> HookResult:
        async with raw_transaction(self._db.engine, tenant_id=None, write=True) as tx:
            dropped = await tx.execute("DELETE FROM orch_run_queue WHERE tenant_id = $1", tenant_id)
        return HookResult(actions=[("runs_cancelled", dropped)])
