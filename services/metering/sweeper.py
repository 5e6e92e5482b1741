"""The background task that returns expired reservations and leases to their budgets."""

from __future__ import annotations

import logging

from services.metering.budgets import BudgetLedger
from services.metering.ledger import UsageLedger
from shared.periodic import Periodic
from shared.tenancy import TenantContext, tenant_scope

log = logging.getLogger("bulkhead.metering.sweeper")

SERVICE_PRINCIPAL = "svc_metering"
"""The principal background work acts as (still one tenant per unit of work)."""


class ExpirySweeper:
    """Every `interval` seconds, sweeps each known tenant's overdue holds, one tenant at a time."""

    def __init__(self, usage: UsageLedger, budgets: BudgetLedger, *, interval: float):
        self._usage = usage
        self._budgets = budgets
        self._interval = interval
        self._periodic = Periodic("metering-expiry-sweeper", self._sweep_and_report, interval=interval, log=log)

    async def run_once(self) -> int:
        """Sweep every tenant once; returns how many holds expired."""
        expired = 0
        for tenant_id, tier in (await self._usage.known_tenants()).items():
            with tenant_scope(TenantContext(tenant_id=tenant_id, principal_id=SERVICE_PRINCIPAL, tier=tier)):
                expired += await self._budgets.sweep()
        return expired

    def start(self) -> None:
        """Run in the background until stop()."""
        self._periodic.start()

    async def stop(self) -> None:
        """Stop the background loop."""
        await self._periodic.stop()

    async def _sweep_and_report(self) -> None:
        if n := await self.run_once():
            log.info("returned %d expired holds to their budgets", n)
