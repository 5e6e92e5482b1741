"""Data residency for secrets: an OpenBao per region, and every call for a tenant goes to its region's.

The region is the one the database router uses (identity's placement of the tenant, cached), so a
tenant's secret values and Transit keys live in the same region as its rows. One region: the plain
VaultBackend, unchanged.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from services.credentials.backend import DataKey, StoredValue, TenantRef
from services.credentials.vault_backend import VaultBackend
from shared.db import Database


class RegionalVault:
    """SecretBackend and KeyBackend that hands each call to the tenant's region's VaultBackend."""

    name = "vault"

    def __init__(self, backends: Mapping[str, VaultBackend], region_of: Callable[[str], Awaitable[str]]) -> None:
        """region_of: the database router's (a region name, cached), not identity's raw RegionLookup."""
        self._backends = dict(backends)
        self._region_of = region_of

    @property
    def backends(self) -> dict[str, VaultBackend]:
        """Each region's backend (a tenant's move between regions reads one and writes the other)."""
        return dict(self._backends)

    @property
    def regions(self) -> tuple[str, ...]:
        """The regions with an OpenBao, default first."""
        return tuple(self._backends)

    async def backend_for(self, tenant: TenantRef) -> VaultBackend:
        """The tenant's region's backend (FailedPrecondition/Unavailable from the lookup as the router raises)."""
        return self._backends[await self._region_of(tenant.tenant_id)]

    async def write(self, tenant: TenantRef, name: str, value: bytes, *, cas: int | None) -> int:
        return await (await self.backend_for(tenant)).write(tenant, name, value, cas=cas)

    async def read(self, tenant: TenantRef, name: str, version: int | None = None) -> StoredValue:
        return await (await self.backend_for(tenant)).read(tenant, name, version)

    async def delete(self, tenant: TenantRef, name: str, versions: list[int]) -> None:
        await (await self.backend_for(tenant)).delete(tenant, name, versions)

    async def destroy(self, tenant: TenantRef, name: str, versions: list[int]) -> None:
        await (await self.backend_for(tenant)).destroy(tenant, name, versions)

    async def purge(self, tenant: TenantRef, name: str) -> None:
        await (await self.backend_for(tenant)).purge(tenant, name)

    async def versions_after(self, tenant: TenantRef, name: str, version: int) -> dict[int, bool]:
        return await (await self.backend_for(tenant)).versions_after(tenant, name, version)

    async def encrypt(self, tenant: TenantRef, plaintext: bytes) -> tuple[bytes, int]:
        return await (await self.backend_for(tenant)).encrypt(tenant, plaintext)

    async def decrypt(self, tenant: TenantRef, ciphertext: bytes) -> bytes:
        return await (await self.backend_for(tenant)).decrypt(tenant, ciphertext)

    async def generate_data_key(self, tenant: TenantRef, bits: int) -> DataKey:
        return await (await self.backend_for(tenant)).generate_data_key(tenant, bits)

    async def rotate_key(self, tenant: TenantRef) -> int:
        return await (await self.backend_for(tenant)).rotate_key(tenant)

    async def rewrap(self, tenant: TenantRef, ciphertext: bytes) -> tuple[bytes, int]:
        return await (await self.backend_for(tenant)).rewrap(tenant, ciphertext)

    async def close(self) -> None:
        for backend in self._backends.values():
            await backend.close()


def make_vault(config, db: Database) -> VaultBackend | RegionalVault:
    """The vault backend of a credentials Config: one VaultBackend, or one per region routed by `db`'s
    placement of each tenant (the regions must be the database's: a tenant with no OpenBao in its
    region would have its secrets written elsewhere)."""
    # The tier picks a silo tenant's namespace: the router's (a migration's placement), never the token's claim.
    default = VaultBackend(
        config.vault_addr,
        config.vault_token,
        token_ttl_seconds=config.tenant_token_ttl,
        placed_tier=db.router.placed_tier,
    )
    if not config.vault_regions:
        return default
    backends = {db.regions[0]: default}
    for region, (addr, token) in config.vault_regions.items():
        backends[region] = VaultBackend(
            addr, token, token_ttl_seconds=config.tenant_token_ttl, placed_tier=db.router.placed_tier
        )
    if set(backends) != set(db.regions):
        raise ValueError(f"OpenBao regions {sorted(backends)} differ from the database's {sorted(db.regions)}")
    return RegionalVault(backends, db.router.region_of)
