"""The state service's configuration, read from the environment (passed in, so tests inject it).

| variable | default | meaning |
|---|---|---|
| BULKHEAD_ENV | development | `production` turns on the strict checks below |
| BULKHEAD_STATE_ENCRYPTION | credentials in production, else local | where data keys come from: `credentials` (the tenant's Transit key via the credentials service), `local` (a master key file in the data dir) or `off` (development only: refused in production) |
| BULKHEAD_STATE_KEY_CACHE_SECONDS | 300 | how long a plain data key stays in memory |
| BULKHEAD_STATE_MAX_EVENT_BYTES | 262144 | largest event payload |
| BULKHEAD_STATE_MAX_EVENTS_PER_APPEND | 1000 | most events per AppendEvents |
| BULKHEAD_STATE_MAX_VALUE_BYTES | 262144 | largest context value |

Plus everything shared.config.ServiceConfig reads (address, database URLs, data dir, peers).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from services.state.records import Limits
from shared.config import ConfigError, EnvReader, ServiceConfig

ENCRYPTION_MODES = ("credentials", "local", "off")

__all__ = ["ENCRYPTION_MODES", "ConfigError", "StateConfig"]


@dataclass(frozen=True)
class StateConfig:
    """Everything the state service needs to start."""

    service: ServiceConfig
    """The settings every service shares."""
    production: bool
    """Whether BULKHEAD_ENV=production."""
    encryption: str
    """`credentials`, `local` or `off`."""
    key_cache_seconds: float
    """Lifetime of a plain data key in memory."""
    limits: Limits
    """Size limits of requests."""

    @property
    def master_key_path(self) -> Path:
        """The local provider's master key file."""
        return self.service.data_dir / "state-master.key"

    @property
    def credentials_addr(self) -> str:
        """Where the credentials service listens."""
        return self.service.peer("credentials")

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> StateConfig:
        """Read and validate the configuration; ConfigError names what is wrong."""
        read = EnvReader(env, "BULKHEAD_STATE_")
        production = env.get("BULKHEAD_ENV", "development").lower() == "production"
        encryption = read.choice("ENCRYPTION", "credentials" if production else "local", ENCRYPTION_MODES, lower=True)
        if production and encryption != "credentials":
            raise ConfigError(
                "in production, state must be encrypted with keys from the credentials service "
                "(BULKHEAD_STATE_ENCRYPTION=credentials)"
            )
        defaults = Limits()
        limits = Limits(
            max_event_bytes=read.positive("MAX_EVENT_BYTES", defaults.max_event_bytes),
            max_events_per_append=read.positive("MAX_EVENTS_PER_APPEND", defaults.max_events_per_append),
            max_value_bytes=read.positive("MAX_VALUE_BYTES", defaults.max_value_bytes),
        )
        return cls(
            service=ServiceConfig.from_env("state", env),
            production=production,
            encryption=encryption,
            key_cache_seconds=read.positive("KEY_CACHE_SECONDS", 300.0),
            limits=limits,
        )
