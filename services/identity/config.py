"""identity's configuration."""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from shared.config import ServiceConfig


@dataclass(frozen=True)
class IdentityConfig:
    """What identity reads from its environment."""

    service: ServiceConfig
    """Address, database, data dir, telemetry."""
    kek_path: Path
    """The key-encryption key that seals signing keys (BULKHEAD_IDENTITY_KEK_FILE; default <data dir>/identity.kek)."""
    revocation_poll: float
    """Seconds between revocation polls (BULKHEAD_REVOCATION_POLL_SECONDS, default 2)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> IdentityConfig:
        service = ServiceConfig.from_env("identity", env)
        return cls(service=service,
                   kek_path=Path(env.get("BULKHEAD_IDENTITY_KEK_FILE", service.data_dir / "identity.kek")),
                   revocation_poll=float(env.get("BULKHEAD_REVOCATION_POLL_SECONDS", "2")))
