"""The credentials service's configuration, read from the environment (passed in, so tests inject it).

| variable | default | meaning |
|---|---|---|
| BULKHEAD_SECRETS_BACKEND | local | `local` (AES-GCM, master key file) or `vault` (OpenBao/Vault) |
| BULKHEAD_VAULT_ADDR | http://127.0.0.1:8200 | OpenBao/Vault address (vault backend) |
| BULKHEAD_VAULT_TOKEN | (required for vault) | the service's privileged token: used only to provision tenants and mint their tokens |
| BULKHEAD_VAULT_ADDR_<REGION> / BULKHEAD_VAULT_TOKEN_<REGION> | (required per other region with the vault backend) / BULKHEAD_VAULT_TOKEN | the OpenBao of each region but the default one (BULKHEAD_REGIONS): a tenant's secrets and keys live only in its region's |
| BULKHEAD_VAULT_TENANT_TOKEN_TTL | 900 | lifetime in seconds of each per-tenant token (reused until 3/4 of it has passed) |
| BULKHEAD_CREDENTIALS_MASTER_KEY | <data dir>/credentials/master.key | the local backend's master key file (created 0600) |
| BULKHEAD_CREDENTIALS_AUDIT_KEY | <data dir>/credentials/audit.key | HMAC key of the audit chain (created 0600; shared by replicas) |
| BULKHEAD_SECRETS_GRACE_SECONDS | 86400 | default time a superseded version stays readable |
| BULKHEAD_ROTATION_INTERVAL | 30 | seconds between passes of the rotation task |
| BULKHEAD_SECRETS_CACHE_SECONDS | 1.0 | how long other replicas may serve a secret's metadata after a change (0: no cache) |
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from shared.config import ConfigError, EnvReader, ServiceConfig, region_suffix


@dataclass(frozen=True)
class Config:
    """Everything the credentials service reads from its environment."""

    service: ServiceConfig
    """The settings every service shares (address, database, data dir, telemetry)."""
    backend: str = "local"
    """`local` or `vault`."""
    vault_addr: str = "http://127.0.0.1:8200"
    """OpenBao/Vault address."""
    vault_token: str = field(default="", repr=False)
    """The privileged token that provisions tenants and mints their tokens. Never logged."""
    tenant_token_ttl: int = 900
    """Seconds each per-tenant token lives."""
    master_key_path: Path = Path(".bulkhead/credentials/master.key")
    """The local backend's master key file."""
    audit_key_path: Path = Path(".bulkhead/credentials/audit.key")
    """The audit chain's HMAC key file."""
    grace_seconds: int = 86400
    """Default grace period of superseded versions."""
    rotation_interval: float = 30.0
    """Seconds between rotation passes."""
    cache_seconds: float = 1.0
    """Lifetime of GetSecret's metadata cache (changes made by this process invalidate it at once)."""
    vault_regions: dict[str, tuple[str, str]] = field(default_factory=dict, repr=False)
    """Region -> (OpenBao address, privileged token) for every region but the default (whose are
    vault_addr/vault_token); empty for a single region or the local backend. Tokens never logged."""

    def vault_tokens(self) -> list[str]:
        """Every privileged OpenBao token this service holds (to redact from logs)."""
        return [t for t in [self.vault_token, *(tok for _, tok in self.vault_regions.values())] if t]

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Config:
        """Read the configuration from env; ConfigError names what is wrong."""
        service = ServiceConfig.from_env("credentials", env)
        read = EnvReader(env, "BULKHEAD_")
        backend = read.choice("SECRETS_BACKEND", "local", ("local", "vault"))
        token = read.text("VAULT_TOKEN")
        if backend == "vault" and not token:
            raise ConfigError("the vault backend needs BULKHEAD_VAULT_TOKEN")
        vault_regions: dict[str, tuple[str, str]] = {}
        if backend == "vault":
            for region in service.regions[1:]:
                suffix = region_suffix(region)
                addr = read.text(f"VAULT_ADDR_{suffix}")
                if not addr:  # never the default region's: a tenant's secrets must stay in its region
                    raise ConfigError(f"region {region!r} has no OpenBao: set BULKHEAD_VAULT_ADDR_{suffix}")
                vault_regions[region] = (addr, read.text(f"VAULT_TOKEN_{suffix}") or token)
        return cls(
            service=service,
            backend=backend,
            vault_regions=vault_regions,
            vault_addr=read.text("VAULT_ADDR", "http://127.0.0.1:8200"),
            vault_token=token,
            tenant_token_ttl=read.positive("VAULT_TENANT_TOKEN_TTL", 900),
            master_key_path=read.path("CREDENTIALS_MASTER_KEY", service.data_dir / "credentials" / "master.key"),
            audit_key_path=read.path("CREDENTIALS_AUDIT_KEY", service.data_dir / "credentials" / "audit.key"),
            grace_seconds=read.int("SECRETS_GRACE_SECONDS", 86400, min=0),
            rotation_interval=read.positive("ROTATION_INTERVAL", 30.0),
            cache_seconds=read.float("SECRETS_CACHE_SECONDS", 1.0, min=0.0),
        )
