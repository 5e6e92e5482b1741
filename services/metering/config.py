"""Metering's settings, read from the environment (passed in, so tests inject their own)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from shared.config import EnvReader, ServiceConfig


@dataclass(frozen=True)
class MeteringConfig:
    """What the metering service reads from its environment."""

    service: ServiceConfig
    """Address, metrics port, database URLs and the rest every service has."""
    sweep_interval_s: float = 15.0
    """How often expired reservations and leases are returned to their budgets (0 = never in the background)."""
    price_cache_s: float = 2.0
    """How long a replica keeps the price table before reading it again."""
    budget_cache_s: float = 2.0
    """How long a replica keeps a tenant's budget specs (limits, periods, modes) before reading them again:
    another replica's SetQuota takes up to this long to apply here (0 = read them on every hold)."""
    workers: int = 1
    """Server processes sharing the listening port (SO_REUSEPORT); each is a replica of its own (workers.py)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> MeteringConfig:
        """Read BULKHEAD_METERING_* (and the common variables) from env; ConfigError names a bad one."""
        read = EnvReader(env, "BULKHEAD_METERING_")
        return cls(
            service=ServiceConfig.from_env("metering", env),
            sweep_interval_s=read.float("SWEEP_INTERVAL", 15.0, min=0.0),
            price_cache_s=read.float("PRICE_CACHE_SECONDS", 2.0, min=0.0),
            budget_cache_s=read.float("BUDGET_CACHE_SECONDS", 2.0, min=0.0),
            workers=read.int("WORKERS", 1, min=1, max=64),
        )
