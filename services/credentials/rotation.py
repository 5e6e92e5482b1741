"""Rotation: pluggable rotators that make new values, and the background task that rotates due
secrets and destroys superseded versions once their grace period is over.
"""

from __future__ import annotations

import asyncio
import logging
import secrets as _random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from services.credentials import store
from shared import errors
from shared.db import Database
from shared.periodic import Periodic
from shared.tenancy import TenantContext, tenant_scope

log = logging.getLogger(__name__)

ROTATOR_PRINCIPAL = "svc_credentials_rotator"
"""The principal scheduled rotations are audited under."""


@dataclass(frozen=True, slots=True)
class RotationRequest:
    """What a rotator is told about the secret it rotates (never the old value)."""

    tenant_id: str
    secret_name: str
    current_version: int


class Rotator(Protocol):
    """Makes the next value of a secret (e.g. by asking a provider for a new API key)."""

    name: str

    async def new_value(self, request: RotationRequest) -> bytes:
        """The new value to store as the next version."""
        ...


class RandomRotator:
    """The built-in rotator: 32 random bytes, URL-safe text."""

    name = "random"

    def __init__(self, nbytes: int = 32) -> None:
        self._nbytes = nbytes

    async def new_value(self, request: RotationRequest) -> bytes:
        """A fresh random token."""
        return _random.token_urlsafe(self._nbytes).encode()


class RotatorRegistry:
    """The rotators a deployment knows by name."""

    def __init__(self, rotators: list[Rotator] | None = None) -> None:
        self._by_name: dict[str, Rotator] = {}
        for rotator in rotators or [RandomRotator()]:
            self.register(rotator)

    def register(self, rotator: Rotator) -> None:
        """Add (or replace) a rotator."""
        self._by_name[rotator.name] = rotator

    def get(self, name: str) -> Rotator:
        """The rotator called `name`; InvalidArgument when unknown."""
        rotator = self._by_name.get(name)
        if rotator is None:
            # Echo clipped: 400 characters of 3-byte text overflowed the 1 KB error details (fuzzer).
            raise errors.InvalidArgument(
                f"no rotator called {errors.clip(repr(name), 100)}",
                reason="ROTATOR_UNKNOWN",
                violations={"rotator": f"known rotators: {', '.join(sorted(self._by_name))}"},
            )
        return rotator


JobRunner = Callable[[str, str], Awaitable[object]]
"""(kind, secret_name) -> work, run inside the job's tenant scope."""


class RotationScheduler:
    """Polls the schedule table and runs due jobs, each as a service principal of its tenant."""

    def __init__(self, db: Database, run_job: JobRunner, *, interval: float = 30.0, batch: int = 100) -> None:
        self._db, self._run_job, self._interval, self._batch = db, run_job, interval, batch
        self._periodic = Periodic("credentials-rotation", self.run_once, interval=interval, log=log, run_first=True)
        self._task: asyncio.Task | None = None

    async def run_once(self) -> int:
        """Run every job due now; returns how many ran (failures are logged and retried later)."""
        jobs = []
        for region in self._db.regions:  # each region's schedule holds its own tenants' jobs
            async with self._db.system_session(region) as s:
                jobs += [
                    (region, j.tenant_id, j.tier, j.kind, j.secret_name)
                    for j in await store.due_jobs(s, now=store.now_us(), limit=self._batch)
                ]
        for region, tenant_id, tier, kind, name in jobs:
            ctx = TenantContext(
                tenant_id=tenant_id,
                principal_id=ROTATOR_PRINCIPAL,
                tier=tier,
                request_id=f"rotation-{_random.token_hex(8)}",
            )
            with tenant_scope(ctx):
                try:
                    await self._run_job(kind, name)
                except errors.NotFound:  # the secret is gone: its job is stale
                    async with self._db.system_session(region) as s:
                        await store.set_schedule(s, tenant_id=tenant_id, tier=tier, name=name, kind=kind, due_us=None)
                except errors.BulkheadError as exc:
                    log.warning(
                        "scheduled %s of a secret failed: %s",
                        kind,
                        exc.reason,
                        extra={"tenant_id": tenant_id, "secret_name": name},
                    )
        return len(jobs)

    def start(self) -> None:
        """Start polling in the background."""
        self._periodic.start()

    async def stop(self) -> None:
        """Stop polling."""
        await self._periodic.stop()
