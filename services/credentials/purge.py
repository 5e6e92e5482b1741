"""Crypto-shredding a deleted tenant: its keys and secret values go before any of its rows.

Destroying the tenant's key makes every ciphertext made with it unreadable wherever a copy
lives (state's data keys are wrapped by it, backups hold the same bytes). Then the values go
(OpenBao KV paths, or the local backend's sealed rows with the rows purge), then the tenant's
policy, and for a silo tenant its whole OpenBao namespace. Every step tolerates "already gone",
so a repeated purge after a crash completes and reports the same key ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import hvac
import hvac.exceptions as vx

from services.credentials.backend import TenantRef
from services.credentials.local_backend import LocalBackend
from services.credentials.regional import RegionalVault
from services.credentials.vault_backend import VaultBackend
from shared.db import Database
from shared.db.raw import raw_transaction
from shared.lifecycle import HookResult
from shared.tiers import Tier

log = logging.getLogger("bulkhead.credentials.purge")


class CredentialsShredder:
    """The credentials service's PurgeHook: destroy the tenant's keys and secret values first."""

    def __init__(self, db: Database, backend: LocalBackend | VaultBackend | RegionalVault) -> None:
        self._db = db
        self._backend = backend

    async def before_rows(self, tenant_id: str, tier: Tier) -> HookResult:
        ref = TenantRef(tenant_id, tier.value)
        if isinstance(self._backend, RegionalVault):  # the tenant's region's OpenBao
            return await asyncio.to_thread(_shred_vault, await self._backend.backend_for(ref), ref)
        if isinstance(self._backend, VaultBackend):
            return await asyncio.to_thread(_shred_vault, self._backend, ref)
        return await self._shred_local(ref, self._backend)

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


def _shred_vault(backend: VaultBackend, ref: TenantRef) -> HookResult:
    """Transit key, KV values, policy, then (silo) the namespace, with the service's admin token."""
    layout = backend.layout
    ns = layout.namespace(ref)
    admin = backend.tokens.admin(ns)
    key = layout.key_name(ref)
    where = f"openbao-namespace:{ns}" if ns else "openbao"
    backend.tokens.forget(ref)  # no cached tenant token may outlive its policy
    if _namespace_gone(backend, ns):
        return HookResult(destroyed_keys=[(f"transit:{key}", where)], actions=[("secrets_destroyed", 0)])
    try:
        admin.secrets.transit.update_key_configuration(key, deletion_allowed=True, mount_point=layout.transit_mount)
        admin.secrets.transit.delete_key(key, mount_point=layout.transit_mount)
    except (vx.InvalidPath, vx.InvalidRequest):
        pass  # no such key (never used, or destroyed by an earlier attempt)
    paths = _kv_paths(admin, layout.kv_mount, layout.prefix(ref) + "/")
    for path in paths:
        admin.secrets.kv.v2.delete_metadata_and_all_versions(path, mount_point=layout.kv_mount)
    admin.sys.delete_policy(layout.policy_name(ref))
    if ns is not None:
        _delete_namespace(backend, admin, ns)
    log.info("shredded tenant %s in OpenBao (%d secrets)", ref.tenant_id, len(paths))
    return HookResult(destroyed_keys=[(f"transit:{key}", where)], actions=[("secrets_destroyed", len(paths))])


def _kv_paths(admin: hvac.Client, mount: str, folder: str) -> list[str]:
    """Every secret path under a KV v2 folder (names may hold '/')."""
    try:
        keys = admin.secrets.kv.v2.list_secrets(folder, mount_point=mount)["data"]["keys"]
    except vx.InvalidPath:
        return []
    out: list[str] = []
    for key in keys:
        out.extend(_kv_paths(admin, mount, folder + key) if key.endswith("/") else [folder + key])
    return out


def _namespace_gone(backend: VaultBackend, ns: str | None) -> bool:
    if ns is None:
        return False
    try:
        listed = backend.tokens.admin(None).sys.list_namespaces()["data"]["keys"]
    except vx.InvalidPath:  # no namespace at all
        return True
    return f"{ns}/" not in listed and ns not in listed


def _delete_namespace(backend: VaultBackend, admin: hvac.Client, ns: str) -> None:
    """Unmount the tenant's engines (their storage goes with them), then delete the namespace."""
    for mount in (backend.layout.kv_mount, backend.layout.transit_mount):
        with contextlib.suppress(vx.InvalidPath):
            admin.sys.disable_secrets_engine(mount)
    with contextlib.suppress(vx.InvalidPath):
        backend.tokens.admin(None).sys.delete_namespace(ns)
