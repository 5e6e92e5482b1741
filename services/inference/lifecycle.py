"""The inference proxy's part of a tenant purge: its undelivered usage reaches metering first.

The usage outbox holds calls metering has not recorded yet. Deleting those rows would take them
out of the ledger that deletion keeps for billing, so the purge delivers them (with the proxy's
platform key) and refuses to go on while any remain: the step fails UNAVAILABLE and identity
retries it.
"""

from __future__ import annotations

from services.inference.store import SqlOutbox
from services.inference.usage import UsageMeter
from shared.errors import Unavailable
from shared.lifecycle import HookResult
from shared.tiers import Tier

_BATCH = 10_000


class DeliverUsage:
    """PurgeHook: flush the tenant's queued and outboxed usage to metering; fail while any is left."""

    def __init__(self, meter: UsageMeter, outbox: SqlOutbox) -> None:
        self._meter = meter
        self._outbox = outbox

    async def before_rows(self, tenant_id: str, tier: Tier) -> HookResult:
        waiting = len(await self._outbox.pending(tenant_id, _BATCH))
        self._meter.adopt_backlog({tenant_id})  # rows another replica left count too
        await self._meter.flush()
        if await self._outbox.pending(tenant_id, 1):
            raise Unavailable(
                "the tenant's usage has not reached metering yet; the purge is retried "
                "(the proxy needs its service key: BULKHEAD_INFERENCE_SERVICE_KEY_FILE)",
                reason="USAGE_UNDELIVERED",
                retry_after=5.0,
            )
        return HookResult(actions=[("usage_delivered", waiting)])
