"""Crypto-shredding a deleted tenant: its keys and secret values go before any of its rows.

Destroying the tenant's key makes every ciphertext made with it unreadable wherever a copy
lives (state's data keys are wrapped by it, backups hold the same bytes). Then the values go
(OpenBao KV paths, or the local backend's sealed rows with the rows purge), then the tenant's
policy, and for a silo tenant its whole OpenBao namespace (vault_purge.py). Every step tolerates
"already gone", so a repeated purge after a crash completes and reports the same key ids.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from services.credentials.backend import TenantRef
from services.credentials.local_backend import LocalBackend
from shared.db import Database
from shared.db.raw import raw_transaction
from shared.lifecycle import HookResult
from shared.tiers import Tier

if TYPE_CHECKING:
    from services.credentials.regional import RegionalVault
    from services.credentials.vault_backend import VaultBackend


class CredentialsShredder:
    """The credentials service's PurgeHook: destroy the tenant's keys and secret values first."""

    def __init__(self, db: Database, backend: LocalBackend | VaultBackend | RegionalVault) -> None:
        self._db = db
        self._backend = backend

    async def before_rows(self, tenant_id: str, tier: Tier) -> HookResult:
        ref = TenantRef(tenant_id, tier.value)
        if isinstance(self._backend, LocalBackend):
            return await self._shred_local(ref, self._backend)
        # The vault backend's modules (hvac, requests) load only in a process that uses it.
        from services.credentials.regional import RegionalVault
        from services.credentials.vault_purge import shred_vault

        if isinstance(self._backend, RegionalVault):  # the tenant's region's OpenBao
            return await asyncio.to_thread(shred_vault, await self._backend.backend_for(ref), ref)
        return await asyncio.to_thread(shred_vault, self._backend, ref)

    async def _shred_local(self, ref: TenantRef, backend: LocalBackend) -> HookResult:
        """Delete the tenant's wrapped key rows in their own committed transaction, before the rest."""
        route = await self._db.router.existing(ref.tenant_id, ref.tier)
        if route is None:
            return HookResult()
        async with raw_transaction(route.bind, tenant_id=ref.tenant_id, schema=route.schema, write=True) as tx:
            rows = await tx.fetch(
                "SELECT purpose, version FROM cred_local_keys WHERE tenant_id = $1 ORDER BY purpose, version",
                ref.tenant_id,
            )
            await tx.execute("DELETE FROM cred_local_keys WHERE tenant_id = $1", ref.tenant_id)
            values = await tx.fetchval("SELECT COUNT(*) FROM cred_local_values WHERE tenant_id = $1", ref.tenant_id)
        backend.forget_tenant(ref.tenant_id)
        return HookResult(
            destroyed_keys=[(f"local:{ref.tenant_id}:{p}:v{v}", "local") for p, v in rows],
            actions=[("secret_versions_shredded", int(values or 0))],
        )
