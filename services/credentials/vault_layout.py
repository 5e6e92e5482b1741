"""Where a tenant's secrets and key live in OpenBao/Vault, and the policy that confines its token."""

from __future__ import annotations

from dataclasses import dataclass

from services.credentials.backend import TenantRef


@dataclass(frozen=True, slots=True)
class VaultLayout:
    """Mount names and path scheme; every name derives from a tenant id already checked by TenantRef."""

    kv_mount: str = "bulkhead-kv"
    """The KV v2 mount holding secret values."""
    transit_mount: str = "bulkhead-transit"
    """The Transit mount holding one key per tenant."""
    namespace_prefix: str = "bulkhead-"
    """Silo tenants get the namespace `<prefix><tenant id>`."""

    def namespace(self, tenant: TenantRef) -> str | None:
        """The tenant's own namespace (silo tier), or None for the root namespace."""
        return f"{self.namespace_prefix}{tenant.tenant_id}" if tenant.tier == "silo" else None

    def prefix(self, tenant: TenantRef) -> str:
        """The KV path prefix the tenant's token may touch."""
        return f"tenants/{tenant.tenant_id}"

    def secret_path(self, tenant: TenantRef, name: str) -> str:
        """The KV path of one secret."""
        return f"{self.prefix(tenant)}/{name}"

    def key_name(self, tenant: TenantRef) -> str:
        """The tenant's Transit key."""
        return f"tenant-{tenant.tenant_id}"

    def policy_name(self, tenant: TenantRef) -> str:
        """The policy attached to the tenant's short-lived tokens."""
        return f"bulkhead-tenant-{tenant.tenant_id}"

    def policy(self, tenant: TenantRef) -> str:
        """HCL granting exactly the tenant's KV prefix and Transit key, nothing else."""
        kv, tr, p, k = self.kv_mount, self.transit_mount, self.prefix(tenant), self.key_name(tenant)
        rules = [
            (f"{kv}/data/{p}/*", '"create", "read", "update"'),
            (f"{kv}/metadata/{p}/*", '"read", "list", "delete"'),
            (f"{kv}/delete/{p}/*", '"update"'),
            (f"{kv}/undelete/{p}/*", '"update"'),
            (f"{kv}/destroy/{p}/*", '"update"'),
            (f"{tr}/encrypt/{k}", '"update"'),
            (f"{tr}/decrypt/{k}", '"update"'),
            (f"{tr}/rewrap/{k}", '"update"'),
            (f"{tr}/datakey/plaintext/{k}", '"update"'),
            (f"{tr}/keys/{k}/rotate", '"update"'),
            (f"{tr}/keys/{k}", '"read"'),
        ]
        return "\n".join(f'path "{path}" {{\n  capabilities = [{caps}]\n}}' for path, caps in rules) + "\n"
