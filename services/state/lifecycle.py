"""The state service's part of a tenant purge: its rows are ciphertext, so only caches need care.

Events, snapshots and context are sealed under data keys that credentials' Transit key (or the
local master key) wraps; the generic purge deletes them with their wrapped data keys. A plain data
key cached in this replica would outlive both, so the cache is emptied first.
"""

from __future__ import annotations

from services.state.envelope import Envelope, PlaintextEnvelope
from shared.lifecycle import HookResult
from shared.tiers import Tier


class ForgetDataKeys:
    """PurgeHook: drop every cached plain data key (other tenants' are fetched again on next use)."""

    def __init__(self, envelope: Envelope | PlaintextEnvelope) -> None:
        self._envelope = envelope

    async def before_rows(self, tenant_id: str, tier: Tier) -> HookResult:
        self._envelope.forget()
        return HookResult(actions=[("data_key_cache_cleared", 1)])
