"""identity's configuration."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from shared.config import EnvReader, ServiceConfig

SERVICE_KEYS_DIR = "service-keys"


@dataclass(frozen=True)
class IdentityConfig:
    """What identity reads from its environment."""

    service: ServiceConfig
    """Address, database, data dir, telemetry."""
    kek_path: Path
    """The key-encryption key that seals signing keys (BULKHEAD_IDENTITY_KEK_FILE; default <data dir>/identity.kek)."""
    revocation_poll: float
    """Seconds between revocation and suspension polls (BULKHEAD_REVOCATION_POLL_SECONDS, default 1)."""
    service_keys_dir: Path
    """Where platform service keys are written on first start (BULKHEAD_IDENTITY_SERVICE_KEYS_DIR; default
    <data dir>/service-keys): a folder of its own, so it can be shared with those services and nothing else."""
    deletion_interval: float = 10.0
    """Seconds between passes over due tenant deletions (BULKHEAD_IDENTITY_DELETION_INTERVAL_SECONDS)."""
    deletion_lease: float = 180.0
    """Seconds a replica holds a deletion it works on (BULKHEAD_IDENTITY_DELETION_LEASE_SECONDS): renewed before
    each step, so it must outlast the slowest step; a killed replica's deletion waits this long for another."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> IdentityConfig:
        """Read identity's settings from env; ConfigError names a bad one."""
        service = ServiceConfig.from_env("identity", env)
        read = EnvReader(env, "BULKHEAD_")
        return cls(
            service=service,
            kek_path=read.path("IDENTITY_KEK_FILE", service.data_dir / "identity.kek"),
            revocation_poll=read.positive("REVOCATION_POLL_SECONDS", 1.0),
            service_keys_dir=read.path("IDENTITY_SERVICE_KEYS_DIR", service.data_dir / SERVICE_KEYS_DIR),
            deletion_interval=read.positive("IDENTITY_DELETION_INTERVAL_SECONDS", 10.0),
            deletion_lease=read.positive("IDENTITY_DELETION_LEASE_SECONDS", 180.0),
        )
