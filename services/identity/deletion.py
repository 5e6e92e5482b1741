"""Tenant deletion: a durable plan of TenantLifecycleService calls, run step by step, ending in a signed receipt.

DeleteTenant marks the tenant `deleting` at once (every verifier then refuses its tokens, as for a
suspension) and writes one row per step. After the grace period a Periodic (and, for `now`, an
immediate kick) runs the steps in order: orchestrator (stop runs), credentials (keys first),
state, inference, metering, then identity's own principals, keys and tokens. Each step records
the service's inventory once before its first purge attempt and its purge result after; a failed
step is retried on the next pass and nothing after it runs. Purges are idempotent, so a process
killed mid-way simply runs the unfinished step again. The tenant row ends as a tombstone.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

import grpc
from google.protobuf.json_format import MessageToDict
from sqlalchemy import CursorResult, select, update

from bulkhead.common.v1 import lifecycle_pb2 as lpb
from services.identity.peers import LifecyclePeers
from services.identity.receipts import build_receipt, sign_receipt
from services.identity.signing import SigningKeys, as_utc, utcnow
from services.identity.store import DeletionRow, DeletionStepRow, TenantRow
from shared.db import Database
from shared.errors import BulkheadError, FailedPrecondition, InvalidArgument, NotFound
from shared.lifecycle import TenantLifecycle, purge_pb
from shared.tenancy import PLATFORM_TENANT
from shared.tiers import Tier, tier_to_proto

log = logging.getLogger("bulkhead.identity.deletion")

STEPS = ("orchestrator", "credentials", "state", "inference", "metering", "identity")
"""The order of a deletion: runs stop first, keys go before rows, identity's own rows go last."""
MAX_GRACE = timedelta(days=90)
SETTLE = timedelta(seconds=3)
"""Even `now` waits this long after the tenant turns `deleting`: every verifier polls the suspended
list about once a second, so by then no service still serves the tenant (or resumes its runs)
while its rows go."""


@dataclass(frozen=True)
class DeletionView:
    """A deletion and its steps, as read in one transaction."""

    row: DeletionRow
    steps: list[DeletionStepRow]


class Deletions:
    """Schedules, restores and executes tenant deletions in identity's database."""

    def __init__(
        self,
        db: Database,
        keys: SigningKeys,
        own: TenantLifecycle,
        *,
        peers: MutableMapping[str, str],
        channel_for: Callable[[str], grpc.aio.Channel],
        on_status_change: Callable[[], Awaitable[object]] | None = None,
        lease_seconds: float = 180.0,
    ) -> None:
        """peers: service name -> address (a mutable map: tests fill it once the services listen)."""
        self._db = db
        self._keys = keys
        self._own = own
        self.peers = peers
        self._lifecycle = LifecyclePeers(keys, peers, channel_for)
        self._on_change = on_status_change
        self._lease = timedelta(seconds=lease_seconds)
        self._busy = asyncio.Lock()
        self._kicks: set[asyncio.Task] = set()

    # -- operator requests ----------------------------------------------------------------------
    async def schedule(self, tenant_id: str, grace_seconds: int, now: bool) -> DeletionView:
        """Suspend the tenant as `deleting` and plan its purge; a repeat returns the existing plan
        (with `now`, brought forward)."""
        if not tenant_id:
            raise InvalidArgument("tenant_id is required", violations={"tenant_id": "the tenant to delete"})
        if grace_seconds < 0 or (now and grace_seconds) or (not now and grace_seconds == 0):
            raise InvalidArgument(
                "give either a grace period or now, not both or neither",
                violations={"grace_seconds": "> 0 without now; 0 with now"},
                reason="BAD_GRACE",
            )
        if timedelta(seconds=grace_seconds) > MAX_GRACE:
            raise InvalidArgument(
                "grace period longer than 90 days", violations={"grace_seconds": "at most 90 days"}, reason="BAD_GRACE"
            )
        if tenant_id == PLATFORM_TENANT:
            raise FailedPrecondition("the platform tenant cannot be deleted", reason="PLATFORM_TENANT")
        at = utcnow()
        async with self._db.system_session() as s:
            tenant = await s.get(TenantRow, tenant_id)
            if tenant is None:
                raise NotFound("tenant not found", reason="TENANT_NOT_FOUND")
            existing = await s.get(DeletionRow, tenant_id)
            if existing is None:
                Tier.parse(tenant.tier)
                s.add(
                    DeletionRow(
                        tenant_id=tenant_id,
                        tier=tenant.tier,
                        state="scheduled",
                        requested_at=at,
                        delete_after=at + max(timedelta(seconds=grace_seconds), SETTLE),
                    )
                )
                s.add_all(
                    DeletionStepRow(tenant_id=tenant_id, service=svc, position=i, done=False, attempts=0, last_error="")
                    for i, svc in enumerate(STEPS)
                )
                tenant.status = "deleting"
            elif now and existing.state == "scheduled":  # the operator no longer wants to wait
                existing.delete_after = min(as_utc(existing.delete_after), at + SETTLE)
        await self._changed()
        if existing is None:
            log.info("tenant %s scheduled for deletion (grace %ds)", tenant_id, grace_seconds)
        if now:
            self.kick(tenant_id)
        return await self.get(tenant_id)

    async def restore(self, tenant_id: str) -> None:
        """Cancel a deletion that has not started: the plan goes, the tenant is active again."""
        async with self._db.system_session() as s:
            row = await s.get(DeletionRow, tenant_id)
            tenant = await s.get(TenantRow, tenant_id)
            if row is not None and row.state != "scheduled":
                raise FailedPrecondition(
                    "the tenant's deletion has started and cannot be undone", reason="DELETION_STARTED"
                )
            if row is not None:
                for step in (
                    await s.execute(select(DeletionStepRow).where(DeletionStepRow.tenant_id == tenant_id))
                ).scalars():
                    await s.delete(step)
                await s.delete(row)
            if tenant is not None:
                tenant.status = "active"
        await self._changed()

    async def get(self, tenant_id: str) -> DeletionView:
        """The tenant's deletion; NotFound when none was asked for."""
        async with self._db.system_session() as s:
            row = await s.get(DeletionRow, tenant_id)
            if row is None:
                raise NotFound("no deletion for that tenant", reason="DELETION_NOT_FOUND")
            steps = list(
                (
                    await s.execute(
                        select(DeletionStepRow)
                        .where(DeletionStepRow.tenant_id == tenant_id)
                        .order_by(DeletionStepRow.position)
                    )
                ).scalars()
            )
        return DeletionView(row, steps)

    # -- execution ------------------------------------------------------------------------------
    def kick(self, tenant_id: str) -> None:
        """Run a deletion in the background as soon as it is due (the Periodic would, a pass later)."""

        async def when_due() -> None:
            view = await self.get(tenant_id)
            await asyncio.sleep(max(0.0, (as_utc(view.row.delete_after) - utcnow()).total_seconds()))
            await self.run(tenant_id)

        # A fresh context: the request's configuration-audit change must not ride on the run's writes.
        task = asyncio.get_running_loop().create_task(
            when_due(), name=f"delete-{tenant_id}", context=contextvars.Context()
        )
        self._kicks.add(task)
        task.add_done_callback(self._kicks.discard)

    async def run_due(self) -> None:
        """One pass of the Periodic: every deletion that is due and not finished."""
        async with self._db.system_session() as s:
            due = list(
                (
                    await s.execute(
                        select(DeletionRow.tenant_id).where(
                            DeletionRow.state != "done", DeletionRow.delete_after <= utcnow()
                        )
                    )
                ).scalars()
            )
        for tenant_id in due:
            await self.run(tenant_id)

    async def run(self, tenant_id: str) -> bool:
        """Run the tenant's unfinished steps in order; True once the receipt is signed."""
        async with self._busy:
            if not await self._claim(tenant_id):
                return False
            try:
                view = await self.get(tenant_id)
                tier = Tier.parse(view.row.tier)
                for step in view.steps:
                    if step.done:
                        continue
                    await self._renew(tenant_id)  # a long purge must not let another replica in
                    if not await self._run_step(tenant_id, tier, step):
                        return False
                await self._finish(tenant_id)
                return True
            finally:
                await self._release(tenant_id)

    async def close(self) -> None:
        """Cancel background runs (their steps resume on the next start)."""
        for task in list(self._kicks):
            task.cancel()
        await asyncio.gather(*self._kicks, return_exceptions=True)

    async def _claim(self, tenant_id: str) -> bool:
        """Take the deletion's lease, so two identity replicas never run it at once."""
        now = utcnow()
        async with self._db.system_session() as s:
            result = await s.execute(
                update(DeletionRow)
                .where(
                    DeletionRow.tenant_id == tenant_id,
                    DeletionRow.state != "done",
                    DeletionRow.delete_after <= now,
                    (DeletionRow.lease_until.is_(None)) | (DeletionRow.lease_until < now),
                )
                .values(lease_until=now + self._lease, state="running")
            )
        return cast("CursorResult[Any]", result).rowcount == 1  # an UPDATE's result is a CursorResult

    async def _renew(self, tenant_id: str) -> None:
        async with self._db.system_session() as s:
            await s.execute(
                update(DeletionRow).where(DeletionRow.tenant_id == tenant_id).values(lease_until=utcnow() + self._lease)
            )

    async def _release(self, tenant_id: str) -> None:
        async with self._db.system_session() as s:
            await s.execute(update(DeletionRow).where(DeletionRow.tenant_id == tenant_id).values(lease_until=None))

    async def _run_step(self, tenant_id: str, tier: Tier, step: DeletionStepRow) -> bool:
        proto_tier = tier_to_proto(tier.value)
        try:
            if step.service == "identity":
                inventory = lpb.InventoryTenantResponse(
                    service="identity",
                    tables=[
                        lpb.TableInventory(store=t.store, table=t.table, rows=t.rows, checksum=t.checksum)
                        for t in await self._own.inventory(tenant_id, tier)
                    ],
                )
            else:
                inventory = await self._lifecycle.call(
                    step.service, "InventoryTenant", lpb.InventoryTenantRequest(tenant_id=tenant_id, tier=proto_tier)
                )
            await self._record(tenant_id, step.service, inventory=inventory)
            if step.service == "identity":
                result = purge_pb("identity", await self._own.purge(tenant_id, tier))
            else:
                result = await self._lifecycle.call(
                    step.service, "PurgeTenant", lpb.PurgeTenantRequest(tenant_id=tenant_id, tier=proto_tier)
                )
        except BulkheadError as exc:  # a peer's failure (peer_call), or identity's own refusal
            await self._record(tenant_id, step.service, error=f"{exc.code.name}: {exc.message}"[:300])
            log.warning(
                "deletion of %s: %s failed (%s); retried on the next pass", tenant_id, step.service, exc.code.name
            )
            return False
        except Exception as exc:  # a step must fail visibly and be retried, never end the plan
            await self._record(tenant_id, step.service, error=f"{type(exc).__name__}"[:300])
            log.exception("deletion of %s: %s failed; retried on the next pass", tenant_id, step.service)
            return False
        await self._record(tenant_id, step.service, result=result)
        log.info("deletion of %s: %s purged", tenant_id, step.service)
        return True

    async def _record(self, tenant_id: str, service: str, *, inventory=None, result=None, error: str = "") -> None:
        async with self._db.system_session() as s:
            step = await s.get_one(DeletionStepRow, (tenant_id, service))
            if inventory is not None and step.inventory is None:  # the first count is what existed
                step.inventory = json.dumps(MessageToDict(inventory))
            if result is not None:
                step.result = json.dumps(MessageToDict(result))
                step.done, step.last_error = True, ""
            if error:
                step.attempts += 1
                step.last_error = error

    async def _finish(self, tenant_id: str) -> None:
        """Tombstone the tenant and sign the receipt, in one transaction."""
        view = await self.get(tenant_id)
        key = await self._keys.active()
        async with self._db.system_session() as s:
            row = await s.get_one(DeletionRow, tenant_id)
            tenant = await s.get(TenantRow, tenant_id)
            completed = utcnow()
            body = build_receipt(view.row, view.steps, completed_at=completed, region=tenant.region if tenant else "")
            row.receipt_body, row.receipt_signature = body, sign_receipt(key, body)
            row.receipt_kid, row.completed_at, row.state = key.kid, completed, "done"
            if tenant is not None:  # the tombstone: id, tier, region, times; the name is freed
                tenant.status, tenant.name = "deleted", f"deleted-{tenant_id}"[:63]
        await self._changed()
        log.info("tenant %s deleted; receipt signed with %s", tenant_id, key.kid)

    async def _changed(self) -> None:
        if self._on_change is not None:
            await self._on_change()
