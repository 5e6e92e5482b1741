"""The orchestrator's configuration, read from the environment (passed in, so tests inject it).

| variable | default | meaning |
|---|---|---|
| BULKHEAD_ORCHESTRATOR_RUNS_PER_TENANT | 4 | concurrent runs per tenant; more wait in the queue |
| BULKHEAD_ORCHESTRATOR_MAX_CONCURRENT | 64 | runs one replica executes at once |
| BULKHEAD_ORCHESTRATOR_MAX_STEPS_PER_RUN | 40 | model calls per run, all agents together |
| BULKHEAD_ORCHESTRATOR_LEASE_SECONDS | 15 | run lease; another replica takes over a run this long after its holder died |
| BULKHEAD_ORCHESTRATOR_TOOL_RATE | 5 | HTTP tool calls per second per tenant (burst: 4x) |
| BULKHEAD_ORCHESTRATOR_TOOL_TIMEOUT | 10 | seconds an HTTP tool may take |
| BULKHEAD_ORCHESTRATOR_DELEGATION_TTL | 3600 | lifetime asked for the delegated token (never beyond the caller's) |

Keys live in the data dir: `orchestrator-grant.key` (seals delegated tokens of queued runs) and
`orchestrator-canary.key` (derives tenant canary markers; replicas must share it).
Plus everything shared.config.ServiceConfig reads (address, database URLs and pool, data dir, peers).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from services.orchestrator.grants import load_or_create_key
from shared.config import ConfigError, EnvReader, ServiceConfig


@dataclass(frozen=True)
class OrchestratorConfig:
    """Everything the orchestrator needs to start."""

    service: ServiceConfig
    """The settings every service shares."""
    runs_per_tenant: int = 4
    """Concurrent runs per tenant."""
    max_concurrent: int = 64
    """Runs this replica executes at once."""
    max_steps_per_run: int = 40
    """Model calls per run."""
    lease_seconds: float = 15.0
    """Lease of a running run; heartbeats renew it every third of this."""
    tool_rate: float = 5.0
    """HTTP tool calls per second per tenant."""
    tool_timeout: float = 10.0
    """Seconds per HTTP tool call."""
    delegation_ttl: int = 3600
    """Seconds of delegated-token lifetime to ask for."""

    @property
    def grant_key_path(self) -> Path:
        """Key file sealing delegated tokens."""
        return self.service.data_dir / "orchestrator-grant.key"

    @property
    def canary_key_path(self) -> Path:
        """Key file deriving canary markers."""
        return self.service.data_dir / "orchestrator-canary.key"

    def canary_key(self) -> bytes:
        """The key deriving canary markers: BULKHEAD_ORCHESTRATOR_CANARY_KEY (hex), else the key file (made once)."""
        raw = EnvReader(self.service.env, "BULKHEAD_ORCHESTRATOR_").text("CANARY_KEY")
        try:
            return bytes.fromhex(raw) if raw else load_or_create_key(self.canary_key_path)
        except ValueError:
            raise ConfigError("BULKHEAD_ORCHESTRATOR_CANARY_KEY must be hex") from None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> OrchestratorConfig:
        """Read and validate the configuration; ConfigError names what is wrong."""
        read = EnvReader(env, "BULKHEAD_ORCHESTRATOR_")
        return cls(
            service=ServiceConfig.from_env("orchestrator", env),
            runs_per_tenant=read.positive("RUNS_PER_TENANT", 4),
            max_concurrent=read.positive("MAX_CONCURRENT", 64),
            max_steps_per_run=read.positive("MAX_STEPS_PER_RUN", 40),
            lease_seconds=read.positive("LEASE_SECONDS", 15.0),
            tool_rate=read.positive("TOOL_RATE", 5.0),
            tool_timeout=read.positive("TOOL_TIMEOUT", 10.0),
            delegation_ttl=read.positive("DELEGATION_TTL", 3600),
        )
