"""Live tier migration: a durable plan of TenantLifecycleService calls that moves a tenant to another tier.

MigrateTenant writes the record (tenant_migrations, one step row per service) and runs it in the
background; a Periodic resumes any unfinished one, so a killed identity picks up where it stopped.

copying:   every service, in order: CopyTenant (the service pauses the tenant's requests, waits for
           its transactions in flight, copies its rows to the target store) then VerifyTenant (rows
           and checksums equal on both sides, else the step fails and is retried). A resumed plan in
           this state copies every service again: a pause that lapsed meanwhile let writes land at
           the source, and a copy replaces what an earlier attempt left at the target.
switch:    one identity transaction sets the tenant's tier (new tokens claim it) and the placement
           generation and ends copying; then every service gets SwitchTenant(target): it routes the
           tenant there whatever its tokens claim (tokens issued before stay valid) and serves it again.
releasing: every service drops what the tenant left at the source tier (ReleaseTenant). A service
           not yet switched when identity resumes here is copied, verified and switched first (its
           source store is still the one it served from).
aborting:  (only before the switch) every service is switched back to the source tier and the
           partial copies are released.

Every replica of every service learns the plan from the feed it polls anyway (ListRevokedTokens,
`migration_feed`): a tenant is published paused from the plan's creation until its last service is
switched (or reverted), and its placement (tier + generation) is published in the transaction that
switches it. The coordinator waits `feed_wait` (the feed's staleness bound: poll interval + margin)
before its first copy, so no replica identity never called writes to the source during the copy;
the pause ends only through a later feed answer than the one that carries the new placement.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import os
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import CursorResult, delete, func, select, update

from bulkhead.common.v1 import lifecycle_pb2 as lpb
from bulkhead.identity.v1 import identity_pb2 as pb
from services.identity.peers import LifecyclePeers
from services.identity.signing import (
    MAX_TOKEN_TTL,
    SigningKeys,
    as_utc,
    live_revocations,
    refused_tenants,
    utcnow,
)
from services.identity.store import (
    MigrationRow,
    MigrationStepRow,
    TenantRow,
    migration_rows,
    not_active_rows,
    platform_reads,
    revocation_rows,
)
from shared.config_audit import ConfigAudit
from shared.db import Database
from shared.errors import BulkheadError, FailedPrecondition, InvalidArgument, NotFound
from shared.ids import check_tenant_id
from shared.lifecycle import Placement
from shared.tenancy import PLATFORM_TENANT
from shared.tiers import Tier, UnknownTier, tier_from_proto, tier_to_proto

log = logging.getLogger("bulkhead.identity.migration")

SERVICES = ("orchestrator", "credentials", "state", "inference", "metering")
"""The services whose tenant rows move (identity keeps its own rows pooled whatever the tier)."""
UNFINISHED = ("copying", "releasing", "aborting")
PAUSE_SECONDS = 30
"""The pause lease each CopyTenant asks for: the longest a dead coordinator leaves a tenant paused."""
FEED_WAIT_SECONDS = float(os.environ.get("BULKHEAD_MIGRATION_FEED_WAIT_SECONDS", "2.5"))
"""The feed's staleness bound: every replica polls it every second (shared.keys, 1 s), plus 1.5 s of margin
(the poll call itself, the transactions a replica admitted just before it heard). The coordinator waits
this long after publishing a pause before it copies anything."""
_PAUSED_PHASES = ("pending", "copied")


@dataclass(frozen=True)
class MigrationView:
    """A migration and its steps, as read in one transaction."""

    row: MigrationRow
    steps: list[MigrationStepRow]


class StepFailed(Exception):
    """A service's step did not complete; the plan stops here and is retried on the next pass."""


class Migrations:
    """Starts, aborts, reports and runs tenants' tier migrations from identity's database."""

    def __init__(
        self,
        db: Database,
        keys: SigningKeys,
        *,
        peers: MutableMapping[str, str],
        channel_for: Callable[[str], grpc.aio.Channel],
        lease_seconds: float = 180.0,
        pause_seconds: int = PAUSE_SECONDS,
        feed_wait: float = FEED_WAIT_SECONDS,
        regions: tuple[str, ...] = (),
    ) -> None:
        """peers: service name -> address (a mutable map: tests fill it once the services listen);
        feed_wait: how long every replica may take to see a published pause (see the module docstring);
        regions: the deployment's data-residency regions (a tenant may be moved to any of them)."""
        self._db = db
        self._regions = tuple(regions)
        self.peers = peers
        self._lifecycle = LifecyclePeers(keys, peers, channel_for)
        self._lease = timedelta(seconds=lease_seconds)
        self._pause = pause_seconds
        self._feed_wait = feed_wait
        self._busy = asyncio.Lock()
        self._kicks: set[asyncio.Task] = set()

    # -- operator requests ----------------------------------------------------------------------
    async def start(self, tenant_id: str, target: str, abort: bool, target_region: str = "") -> MigrationView:
        """Plan the tenant's move to `target` (its tier now when empty) in `target_region` (its region now when
        empty); a repeat returns the plan. Or abort the unfinished one."""
        if target_region and target_region not in self._regions:
            known = ", ".join(self._regions)
            raise InvalidArgument(
                f"unknown region {target_region[:40]!r}: this deployment's regions are {known}",
                reason="UNKNOWN_REGION",
                violations={"target_region": f"one of: {known}"},
            )
        if not tenant_id:
            raise InvalidArgument("tenant_id is required", violations={"tenant_id": "the tenant to move"})
        if tenant_id == PLATFORM_TENANT:
            raise FailedPrecondition("the platform tenant has no tier to change", reason="PLATFORM_TENANT")
        async with self._db.system_session() as s:
            tenant = await s.get(TenantRow, tenant_id)
            if tenant is None or tenant.status == "deleted":
                raise NotFound("tenant not found", reason="TENANT_NOT_FOUND")
            row = await s.get(MigrationRow, tenant_id)
            if abort:
                if row is None or row.state in ("done", "aborted"):
                    if row is None or row.state == "done":
                        raise FailedPrecondition(
                            "the tenant has no migration in progress to abort", reason="NO_MIGRATION"
                        )
                elif row.state == "releasing":
                    raise FailedPrecondition(
                        "the tenant is switched already; migrate it back instead", reason="MIGRATION_SWITCHED"
                    )
                elif row.state == "copying":
                    row.state, row.last_error = "aborting", ""
                    await s.execute(
                        update(MigrationStepRow)
                        .where(MigrationStepRow.tenant_id == tenant_id)
                        .values(phase="pending", last_error="")
                    )
            else:
                if tenant.status == "deleting":
                    raise FailedPrecondition("the tenant is being deleted", reason="TENANT_DELETING")
                if row is not None and row.state in UNFINISHED:
                    target = target or row.target_tier
                    target_region = target_region or row.target_region or tenant.region
                    if (row.target_tier, row.target_region or tenant.region) != (
                        target,
                        target_region,
                    ) or row.state == "aborting":
                        raise FailedPrecondition(
                            f"the tenant's migration to {row.target_tier} is {row.state}; wait for it or abort it",
                            reason="MIGRATION_IN_PROGRESS",
                        )
                elif (tenant.tier, tenant.region) == (target or tenant.tier, target_region or tenant.region):
                    target, target_region = tenant.tier, tenant.region
                    if (
                        row is None
                        or row.state != "done"
                        or row.target_tier != target
                        or (row.target_region or tenant.region) != target_region
                    ):
                        raise InvalidArgument(
                            f"the tenant is {target} in {target_region} already",
                            reason="SAME_TIER",
                            violations={"target_tier": "a tier or region other than the tenant's"},
                        )
                else:
                    if row is not None:
                        await s.execute(delete(MigrationStepRow).where(MigrationStepRow.tenant_id == tenant_id))
                        await s.delete(row)
                        await s.flush()
                    target, target_region = target or tenant.tier, target_region or tenant.region
                    s.add(
                        MigrationRow(
                            tenant_id=tenant_id,
                            source_tier=tenant.tier,
                            target_tier=target,
                            source_region=tenant.region,
                            target_region=target_region,
                            state="copying",
                            generation=0,
                            requested_at=utcnow(),
                            pause_ms=0,
                            last_error="",
                        )
                    )
                    s.add_all(
                        MigrationStepRow(
                            tenant_id=tenant_id, service=svc, position=i, phase="pending", attempts=0, last_error=""
                        )
                        for i, svc in enumerate(SERVICES)
                    )
                    log.info(
                        "tenant %s: migration %s@%s -> %s@%s planned",
                        tenant_id,
                        tenant.tier,
                        tenant.region,
                        target,
                        target_region,
                    )
        self.kick(tenant_id)
        return await self.get(tenant_id)

    async def get(self, tenant_id: str) -> MigrationView:
        """The tenant's latest migration; NotFound when none was asked for."""
        async with self._db.system_session() as s:
            row = await s.get(MigrationRow, tenant_id)
            if row is None:
                raise NotFound("no migration for that tenant", reason="MIGRATION_NOT_FOUND")
            steps = list(
                (
                    await s.execute(
                        select(MigrationStepRow)
                        .where(MigrationStepRow.tenant_id == tenant_id)
                        .order_by(MigrationStepRow.position)
                    )
                ).scalars()
            )
        return MigrationView(row, steps)

    # -- execution ------------------------------------------------------------------------------
    def kick(self, tenant_id: str) -> None:
        """Run the tenant's migration in the background now (the Periodic would, a pass later)."""
        # A fresh context: the task must not inherit the request's configuration-audit change, or its
        # own writes (claims, steps) would each be audited as another tier change.
        task = asyncio.get_running_loop().create_task(
            self.run(tenant_id), name=f"migrate-{tenant_id}", context=contextvars.Context()
        )
        self._kicks.add(task)
        task.add_done_callback(self._kicks.discard)

    async def run_due(self) -> None:
        """One pass of the Periodic: every unfinished migration."""
        async with self._db.system_session() as s:
            due = list(
                (await s.execute(select(MigrationRow.tenant_id).where(MigrationRow.state.in_(UNFINISHED)))).scalars()
            )
        for tenant_id in due:
            await self.run(tenant_id)

    async def run(self, tenant_id: str) -> bool:
        """Run the migration to its end; True when it is done (or aborted)."""
        async with self._busy:
            if not await self._claim(tenant_id):
                return False
            try:
                view = await self.get(tenant_id)
                # Regions are named to the services only when they change (empty: the tenant's region now,
                # which a single-region service knows by no name).
                moves = view.row.source_region != view.row.target_region
                source = Placement(Tier.parse(view.row.source_tier), view.row.source_region if moves else "")
                target = Placement(Tier.parse(view.row.target_tier), view.row.target_region if moves else "")
                if view.row.state == "copying":
                    await self._copy_and_switch(tenant_id, source, target, view.steps)
                    view = await self.get(tenant_id)
                if view.row.state == "releasing":
                    await self._release(tenant_id, source, target, view.steps)
                elif view.row.state == "aborting":
                    await self._abort(tenant_id, source, target, view.steps)
                return True
            except StepFailed:
                return False
            finally:
                await self._unclaim(tenant_id)

    async def close(self) -> None:
        """Cancel background runs (they resume on the next start)."""
        for task in list(self._kicks):
            task.cancel()
        await asyncio.gather(*self._kicks, return_exceptions=True)

    async def _copy_and_switch(
        self, tenant_id: str, source: Placement, target: Placement, steps: list[MigrationStepRow]
    ) -> None:
        started = time.monotonic()
        # The pause is published (this plan is `copying`); every replica refuses the tenant within the
        # feed's staleness bound. Waited on every run: replicas that lost identity meanwhile let it lapse.
        await self._renew(tenant_id)
        await asyncio.sleep(self._feed_wait)
        for step in steps:  # every service again: see the module docstring
            await self._renew(tenant_id)
            await self._copy(tenant_id, step.service, source, target)
        async with self._db.system_session() as s:
            row = await s.get_one(MigrationRow, tenant_id, with_for_update=True)
            if row.state != "copying":  # aborted meanwhile: the next pass rolls back
                raise StepFailed(f"migration is {row.state}")
            tenant = await s.get_one(TenantRow, tenant_id)
            top = await s.scalar(select(func.max(MigrationRow.generation)))
            row.generation = (top or 0) + 1
            row.state = "releasing"
            tenant.tier = target.tier.value
            if target.region:  # new tokens claim the tier; GetTenantPlacement and the feed say the region
                tenant.region = target.region
        log.info("tenant %s: switched to %s in identity", tenant_id, target)
        for step in steps:
            await self._switch(tenant_id, step.service, target, "switched")
        async with self._db.system_session() as s:
            row = await s.get_one(MigrationRow, tenant_id)
            row.pause_ms = int((time.monotonic() - started) * 1000)

    async def _release(
        self, tenant_id: str, source: Placement, target: Placement, steps: list[MigrationStepRow]
    ) -> None:
        if any(step.phase in _PAUSED_PHASES for step in steps):  # still published paused: see _copy_and_switch
            await asyncio.sleep(self._feed_wait)
        for step in steps:
            if step.phase in ("pending", "copied"):  # identity stopped before this service switched
                await self._copy(tenant_id, step.service, source, target)
                await self._switch(tenant_id, step.service, target, "switched")
        for step in steps:
            if step.phase != "released":
                await self._renew(tenant_id)
                await self._release_one(tenant_id, step.service, source, target)
        await self._finish(tenant_id, "done")

    async def _abort(self, tenant_id: str, source: Placement, target: Placement, steps: list[MigrationStepRow]) -> None:
        for step in steps:
            if step.phase == "pending":
                await self._switch(tenant_id, step.service, source, "reverted")
        for step in steps:
            if step.phase != "released":
                await self._release_one(tenant_id, step.service, target, source)
        await self._finish(tenant_id, "aborted")

    # -- one service's calls ------------------------------------------------------------------------
    async def _copy(self, tenant_id: str, service: str, source: Placement, target: Placement) -> None:
        tier, target_tier = tier_to_proto(source.tier.value), tier_to_proto(target.tier.value)
        async with self._step(tenant_id, service):
            await self._lifecycle.call(
                service,
                "CopyTenant",
                lpb.CopyTenantRequest(
                    tenant_id=tenant_id,
                    tier=tier,
                    region=source.region,
                    target_tier=target_tier,
                    target_region=target.region,
                    pause_seconds=self._pause,
                ),
            )
            verified = await self._lifecycle.call(
                service,
                "VerifyTenant",
                lpb.VerifyTenantRequest(
                    tenant_id=tenant_id,
                    tier=tier,
                    region=source.region,
                    target_tier=target_tier,
                    target_region=target.region,
                ),
            )
            if not verified.equal:
                raise StepFailed(f"verify: {', '.join(verified.mismatched_tables)} differ")
        await self._record(tenant_id, service, phase="copied", verify=json.dumps(MessageToDict(verified)))

    async def _switch(self, tenant_id: str, service: str, to: Placement, phase: str) -> None:
        async with self._step(tenant_id, service):
            await self._lifecycle.call(
                service,
                "SwitchTenant",
                lpb.SwitchTenantRequest(tenant_id=tenant_id, tier=tier_to_proto(to.tier.value), region=to.region),
            )
        await self._record(tenant_id, service, phase=phase)

    async def _release_one(self, tenant_id: str, service: str, left: Placement, current: Placement) -> None:
        async with self._step(tenant_id, service):
            out = await self._lifecycle.call(
                service,
                "ReleaseTenant",
                lpb.ReleaseTenantRequest(
                    tenant_id=tenant_id,
                    tier=tier_to_proto(left.tier.value),
                    region=left.region,
                    current_tier=tier_to_proto(current.tier.value),
                    current_region=current.region,
                ),
            )
        await self._record(tenant_id, service, phase="released", released=json.dumps(MessageToDict(out)))

    def _step(self, tenant_id: str, service: str):
        return _Step(self, tenant_id, service)

    async def _record(
        self,
        tenant_id: str,
        service: str,
        *,
        phase: str | None = None,
        verify: str | None = None,
        released: str | None = None,
        error: str = "",
    ) -> None:
        async with self._db.system_session() as s:
            step = await s.get_one(MigrationStepRow, (tenant_id, service))
            if phase is not None:
                step.phase, step.last_error = phase, ""
            if verify is not None:
                step.verify = verify
            if released is not None:
                step.released = released
            if error:
                step.attempts += 1
                step.last_error = error[:300]
                row = await s.get_one(MigrationRow, tenant_id)
                row.last_error = f"{service}: {error}"[:300]

    async def _finish(self, tenant_id: str, state: str) -> None:
        async with self._db.system_session() as s:
            row = await s.get_one(MigrationRow, tenant_id)
            row.state, row.completed_at, row.last_error = state, utcnow(), ""
        log.info("tenant %s: migration %s", tenant_id, state)

    # -- lease: one identity replica runs a migration at a time ---------------------------------------
    async def _claim(self, tenant_id: str) -> bool:
        now = utcnow()
        async with self._db.system_session() as s:
            result = await s.execute(
                update(MigrationRow)
                .where(
                    MigrationRow.tenant_id == tenant_id,
                    MigrationRow.state.in_(UNFINISHED),
                    (MigrationRow.lease_until.is_(None)) | (MigrationRow.lease_until < now),
                )
                .values(lease_until=now + self._lease)
            )
        return cast("CursorResult[Any]", result).rowcount == 1  # an UPDATE's result is a CursorResult

    async def _renew(self, tenant_id: str) -> None:
        async with self._db.system_session() as s:
            await s.execute(
                update(MigrationRow)
                .where(MigrationRow.tenant_id == tenant_id)
                .values(lease_until=utcnow() + self._lease)
            )

    async def _unclaim(self, tenant_id: str) -> None:
        async with self._db.system_session() as s:
            await s.execute(update(MigrationRow).where(MigrationRow.tenant_id == tenant_id).values(lease_until=None))


async def migration_feed(db: Database) -> tuple[frozenset[str], dict[str, tuple[str, int]], dict[str, str]]:
    """What every replica applies (published with ListRevokedTokens): the tenants a migration pauses now,
    and {tenant: (tier, generation)} of every tenant whose migration is unfinished or ended within the
    longest token lifetime (later every live token claims its tier: delegated tokens die with their
    parent), so the list stays small. Paused: a plan still copying, or one switched (or aborted) whose
    services are not all switched (reverted) yet. Third: the same tenants' regions (a move may change it)."""
    now = utcnow()
    async with platform_reads(db) as tx:
        return migration_feed_of(*await migration_rows(tx, _PAUSED_PHASES), now)


def migration_feed_of(
    rows: list[tuple[str, str, int, str, datetime | None, str]], unswitched: set[str], now: datetime
) -> tuple[frozenset[str], dict[str, tuple[str, int]], dict[str, str]]:
    """migration_feed() of store.migration_rows (with _PAUSED_PHASES) read at `now`."""
    cutoff = now - timedelta(seconds=MAX_TOKEN_TTL + 60)
    paused = frozenset(
        tid for tid, state, _, _, _, _ in rows if state == "copying" or (state in UNFINISHED and tid in unswitched)
    )
    recent = [row for row in rows if row[4] is None or as_utc(row[4]) >= cutoff]
    return (
        paused,
        {tid: (tier, generation) for tid, _, generation, tier, _, _ in recent},
        {tid: region for tid, _, _, _, _, region in recent},
    )


async def published_feed(
    db: Database, since: int
) -> tuple[
    tuple[int, dict[str, int]], frozenset[str], tuple[frozenset[str], dict[str, tuple[str, int]], dict[str, str]]
]:
    """ListRevokedTokens' answer in one transaction (every other service polls it each second): revocations_since
    (since), suspended_tenants() and migration_feed(), read in that order as when each had its own transaction
    (on Postgres each statement still reads what committed before it; on SQLite all three read one snapshot)."""
    now = utcnow()
    async with platform_reads(db) as tx:
        revoked = live_revocations(await revocation_rows(tx, since), since, now)
        suspended = refused_tenants(await not_active_rows(tx), now)
        feed = migration_feed_of(*await migration_rows(tx, _PAUSED_PHASES), now)
    return revoked, suspended, feed


class _Step:
    """Records a failed call on its step (and stops the plan) instead of letting it escape."""

    def __init__(self, owner: Migrations, tenant_id: str, service: str) -> None:
        self._owner, self._tenant, self._service = owner, tenant_id, service

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, kind, exc, tb) -> bool:
        if exc is None:
            return False
        if isinstance(exc, BulkheadError):  # a peer's failure (peer_call), or identity's own refusal
            error = f"{exc.code.name}: {exc.message}"
        elif isinstance(exc, StepFailed):
            error = str(exc)
        elif isinstance(exc, Exception):
            error = type(exc).__name__
            log.exception("migration of %s: %s failed; retried on the next pass", self._tenant, self._service)
        else:
            return False  # cancellation: let it through
        await self._owner._record(self._tenant, self._service, error=error)
        log.warning("migration of %s: %s failed (%s); retried on the next pass", self._tenant, self._service, error)
        raise StepFailed(error)


_STATE_PB = {
    "copying": pb.MIGRATION_STATE_COPYING,
    "releasing": pb.MIGRATION_STATE_RELEASING,
    "done": pb.MIGRATION_STATE_DONE,
    "aborting": pb.MIGRATION_STATE_ABORTING,
    "aborted": pb.MIGRATION_STATE_ABORTED,
}


def migration_pb(view: MigrationView):
    """The TenantMigration message of a migration (tables from each step's last verification)."""

    def ts(value) -> Timestamp | None:
        if value is None:
            return None
        out = Timestamp()
        out.FromDatetime(value)
        return out

    steps = []
    for step in view.steps:
        tables = []
        if step.verify:
            verified = json.loads(step.verify)
            for src, dst in zip(verified.get("source", []), verified.get("target", []), strict=False):
                tables.append(
                    pb.TableProgress(
                        table=src.get("table", ""),
                        rows=int(src.get("rows", 0)),
                        equal=(src.get("rows"), src.get("checksum")) == (dst.get("rows"), dst.get("checksum")),
                    )
                )
        steps.append(
            pb.MigrationStep(
                service=step.service,
                phase=step.phase,
                attempts=step.attempts,
                last_error=step.last_error,
                tables=tables,
            )
        )
    row = view.row
    return pb.TenantMigration(
        tenant_id=row.tenant_id,
        source_tier=tier_to_proto(row.source_tier),
        target_tier=tier_to_proto(row.target_tier),
        source_region=row.source_region,
        target_region=row.target_region,
        state=_STATE_PB[row.state],
        generation=row.generation,
        pause_ms=row.pause_ms,
        request_time=ts(row.requested_at),
        complete_time=ts(row.completed_at),
        last_error=row.last_error,
        steps=steps,
    )


class MigrationRpcs:
    """IdentityServicer's MigrateTenant and GetMigration, mixed in (server.py sets `migrations`)."""

    migrations: Migrations | None = None
    _audit: ConfigAudit  # IdentityServicer's

    def _migrations_or_fail(self) -> Migrations:
        if self.migrations is None:
            raise FailedPrecondition("tier migration is not configured on this identity", reason="NO_MIGRATIONS")
        return self.migrations

    async def MigrateTenant(self, request, context):
        migrations = self._migrations_or_fail()
        check_tenant_id(request.tenant_id)
        target = ""
        if not request.abort:
            try:
                if request.target_tier == 0 and not request.target_region:  # a region move keeps the tier
                    raise UnknownTier("unset")
                target = tier_from_proto(request.target_tier).value if request.target_tier else ""
            except UnknownTier:
                raise InvalidArgument(
                    "target_tier must be set to a known tier",
                    reason="INVALID_TIER",
                    violations={"target_tier": "TIER_POOLED, TIER_BRIDGE or TIER_SILO"},
                ) from None
        async with self._audit.change(
            "tenant.tier",
            tenant_id=request.tenant_id,
            target=f"tenant/{request.tenant_id}",
            tables={"tenant_migrations"},
            detail={
                "target_tier": target,
                "abort": request.abort,
                **({"target_region": request.target_region} if request.target_region and not request.abort else {}),
            },
        ):
            view = await migrations.start(
                request.tenant_id, target, request.abort, "" if request.abort else request.target_region
            )
        return pb.MigrateTenantResponse(migration=migration_pb(view))

    async def GetMigration(self, request, context):
        check_tenant_id(request.tenant_id)
        view = await self._migrations_or_fail().get(request.tenant_id)
        return pb.GetMigrationResponse(migration=migration_pb(view))
