"""Persistence of teams, runs and the run queue (SQLAlchemy 2 async via shared.db). No grpc here.

Teams and runs are tenant-owned rows (ORM criteria + Postgres RLS). The run queue is a platform
table holding only ids, timestamps, leases and the sealed delegated token: the dispatcher must
see every tenant's queue to be fair, and never needs their data. It is only ever touched in a
system session: a tenant session writes where the tenant's tier puts its rows (a schema, SQLite
file or database of its own for bridge and silo), where no dispatcher would ever look.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import json
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import (
    Boolean,
    CursorResult,
    Float,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column

from services.orchestrator.history import Finished
from services.orchestrator.runs import RunStatus, check_transition
from services.orchestrator.scheduler import QueuedRun, pick_runs
from services.orchestrator.steps import Step, StepKind
from services.orchestrator.team import TeamSpec
from services.orchestrator.wakeups import NOTIFY_SQL, QUEUE_CHANNEL
from shared import paging
from shared.db import Base, Database, TenantOwned
from shared.db.raw import raw_transaction
from shared.errors import Aborted, AlreadyExists, NotFound, clip
from shared.paging import Page
from shared.tenancy import require_tenant


class OrchestratorBase(Base):
    """The orchestrator's tables."""


class TeamRow(OrchestratorBase, TenantOwned):
    """A team definition of one tenant."""

    __tablename__ = "orch_teams"
    __table_args__ = (UniqueConstraint("tenant_id", "name", name="uq_orch_teams_tenant_name"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    spec: Mapped[str] = mapped_column(Text)
    etag: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class RunRow(OrchestratorBase, TenantOwned):
    """A run of one tenant, with a snapshot of the team it started with."""

    __tablename__ = "orch_runs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_orch_runs_tenant_idem"),
        Index("ix_orch_runs_tenant_created", "tenant_id", "created_at"),
    )
    run_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    team: Mapped[str] = mapped_column(String(64))
    team_spec: Mapped[str] = mapped_column(Text)
    entry_agent: Mapped[str] = mapped_column(String(64))
    input: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    current_agent: Mapped[str] = mapped_column(String(64))
    output: Mapped[str] = mapped_column(Text, default="")
    error_reason: Mapped[str] = mapped_column(String(64), default="")
    error_message: Mapped[str] = mapped_column(Text, default="")
    step_count: Mapped[int] = mapped_column(Integer, default=0)
    idempotency_key: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    trace_id: Mapped[str] = mapped_column(String(32), default="")
    """StartRun's W3C trace id: the queue entry that holds its traceparent goes when the run ends."""


class StepRow(OrchestratorBase, TenantOwned):
    """A copy of a run's step as appended to state, for GetRun/WatchRun without a trip to state."""

    __tablename__ = "orch_steps"
    __table_args__ = (Index("ix_orch_steps_tenant_created", "tenant_id", "created_at"),)
    run_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    payload: Mapped[str] = mapped_column(Text)
    agent: Mapped[str] = mapped_column(String(64), default="")
    """The agent that acted (copied out of payload so GetRunStats can group in SQL)."""
    created_at: Mapped[float] = mapped_column(Float, default=0.0)
    """When the step was recorded."""
    latency_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    """Time since the run's step before; None for a run's first step and its RUN_FINISHED."""


class QueueRow(OrchestratorBase):
    """Scheduling of one unfinished run: queue position and lease. Ids only, no tenant data."""

    __tablename__ = "orch_run_queue"
    __table_args__ = (Index("ix_orch_run_queue_state", "state", "enqueued_at"),)
    run_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    principal_id: Mapped[str] = mapped_column(String(64))
    tier: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))  # queued | running
    enqueued_at: Mapped[float] = mapped_column(Float)
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_expires: Mapped[float] = mapped_column(Float, default=0.0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    grant: Mapped[bytes] = mapped_column(LargeBinary)
    traceparent: Mapped[str] = mapped_column(String(64), default="")
    """The W3C trace context of StartRun, so the run (and any resumption) continues that trace."""


# --- records ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TeamRecord:
    """A stored team."""

    spec: TeamSpec
    etag: str
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class RunRecord:
    """A stored run."""

    run_id: str
    team: str
    team_spec: TeamSpec
    entry_agent: str
    input: str
    status: RunStatus
    current_agent: str
    output: str
    error_reason: str
    error_message: str
    step_count: int
    idempotency_key: str
    created_at: float
    updated_at: float
    trace_id: str = ""
    """StartRun's W3C trace id ("" when it was not traced)."""


@dataclass(frozen=True)
class Claim:
    """A run this replica now holds the lease of."""

    run_id: str
    tenant_id: str
    principal_id: str
    tier: str
    grant: bytes = field(repr=False)
    cancel_requested: bool = False
    traceparent: str = ""


@dataclass(frozen=True)
class Lease:
    """A replica's offer to execute a new run at once (RunStore.create), if the queue lets it start now."""

    owner: str
    """The replica that would hold the lease."""
    ttl: float
    """Lease length in seconds."""
    per_tenant_limit: int
    """Concurrent runs per tenant (across replicas)."""
    free_slots: int
    """Runs the replica could start now."""


@dataclass(frozen=True)
class QueuePlace:
    """Why a queued run has not started yet, within its own tenant."""

    position: int
    """Its place among the tenant's waiting runs, from 1."""
    running: int
    """The tenant's runs holding a live lease."""


def _team(row: TeamRow) -> TeamRecord:
    return TeamRecord(TeamSpec.from_dict(json.loads(row.spec)), row.etag, row.created_at, row.updated_at)


def _run(row: RunRow) -> RunRecord:
    return RunRecord(
        row.run_id,
        row.team,
        TeamSpec.from_dict(json.loads(row.team_spec)),
        row.entry_agent,
        row.input,
        RunStatus(row.status),
        row.current_agent,
        row.output,
        row.error_reason,
        row.error_message,
        row.step_count,
        row.idempotency_key or "",
        row.created_at,
        row.updated_at,
        row.trace_id or "",
    )


_RUN_COLUMNS = (
    "run_id, team, team_spec, entry_agent, input, status, current_agent, output, error_reason, "
    "error_message, step_count, idempotency_key, created_at, updated_at, trace_id"
)
"""orch_runs' columns in RunRecord's order, for the raw hot paths."""


def _run_raw(r: Any) -> RunRecord:
    return RunRecord(
        r[0],
        r[1],
        TeamSpec.from_dict(json.loads(r[2])),
        r[3],
        r[4],
        RunStatus(r[5]),
        r[6],
        r[7] or "",
        r[8] or "",
        r[9] or "",
        r[10] or 0,
        r[11] or "",
        r[12],
        r[13],
        r[14] or "",
    )


def _queue_view(rows: Any, now: float) -> tuple[list[QueuedRun], Counter[str]]:
    """Queue rows (run_id, tenant_id, state, enqueued_at, lease_expires) as (waiting runs, live leases per tenant)."""
    running: Counter[str] = Counter()
    waiting: list[QueuedRun] = []
    for run_id, tenant_id, state, enqueued_at, expires in rows:
        if state == "running" and expires > now:
            running[tenant_id] += 1
        else:
            waiting.append(QueuedRun(tenant_id, run_id, enqueued_at))
    return waiting, running


_QUEUE_SQL = "SELECT run_id, tenant_id, state, enqueued_at, lease_expires FROM orch_run_queue"
"""The whole queue, for _queue_view."""

_CLAIM_SQL = (
    "UPDATE orch_run_queue SET state = 'running', lease_owner = $2, lease_expires = $3 "
    "WHERE run_id = $1 AND (state = 'queued' OR lease_expires <= $4) "
    'RETURNING run_id, tenant_id, principal_id, tier, "grant", cancel_requested, traceparent'
)
"""Take the lease of a waiting run ($1 run, $2 owner, $3 expiry, $4 now); no row when it is not waiting."""


def _claim_of(row: Any) -> Claim:
    return Claim(row[0], row[1], row[2], row[3], bytes(row[4]), bool(row[5]), row[6] or "")


_LEASED_SQL = (
    "INSERT INTO orch_run_queue (run_id, tenant_id, principal_id, tier, state, enqueued_at, lease_owner, "
    'lease_expires, cancel_requested, "grant", traceparent) '
    "VALUES ($1, $2, $3, $4, 'running', $5, $6, $7, $8, $9, $10)"
)
"""A new run's entry, leased already ($5 now, $6 owner, $7 lease expiry)."""

_LEASED_IF_ALONE_SQL = (
    "INSERT INTO orch_run_queue (run_id, tenant_id, principal_id, tier, state, enqueued_at, lease_owner, "
    'lease_expires, cancel_requested, "grant", traceparent) '
    "SELECT $1, $2, $3, $4, 'running', $5, $6, $7, $8, $9, $10 "
    "WHERE NOT EXISTS (SELECT 1 FROM orch_run_queue WHERE state <> 'running' OR lease_expires <= $11) "
    "AND (SELECT count(*) FROM orch_run_queue WHERE tenant_id = $12 AND state = 'running' AND lease_expires > $11) "
    "< $13"
)
"""_LEASED_SQL when no run waits at $11 (now; _queue_view's sense: queued, or leased but expired) and tenant $12
holds fewer than $13 live leases: then pick_runs, given a free slot, picks the new run whatever runs elsewhere.
(The conditions take parameters of their own: Postgres deduces one type per parameter.)"""

_PLACE_SQL = "SELECT run_id, state, enqueued_at, lease_expires FROM orch_run_queue WHERE tenant_id = $1"
"""One tenant's queue entries, for QueuePlace."""


def _place_of(rows: Any, run_id: str, now: float) -> QueuePlace | None:
    """Where run_id waits among one tenant's queue entries (_PLACE_SQL's rows); None when it is not waiting."""
    live = [r for r in rows if r[1] == "running" and r[3] > now]
    waiting = sorted((r for r in rows if not (r[1] == "running" and r[3] > now)), key=lambda r: (r[2], r[0]))
    ids = [r[0] for r in waiting]
    if run_id not in ids:
        return None
    return QueuePlace(position=ids.index(run_id) + 1, running=len(live))


async def _notify(tx: Any, origin: str) -> None:
    """Tell every replica listening (Postgres) that the queue changed, when this transaction commits."""
    if tx.dialect == "postgresql":
        await tx.execute(NOTIFY_SQL, origin)


def trace_id_of(traceparent: str) -> str:
    """The trace id of a W3C traceparent ("00-<32 hex>-<16 hex>-<2 hex>"), "" when it is not one."""
    parts = traceparent.split("-")
    if len(parts) == 4 and len(parts[1]) == 32 and all(c in "0123456789abcdef" for c in parts[1]):
        return "" if parts[1] == "0" * 32 else parts[1]
    return ""


def step_latency_ms(step: Step, previous_at: float | None) -> float | None:
    """How long a step took: since the run's step before. None for the first step and RUN_FINISHED
    (which only records the end, as the console has always counted it)."""
    if previous_at is None or step.kind == StepKind.RUN_FINISHED:
        return None
    return max(0.0, (step.created_at - previous_at) * 1000.0)


def new_run_id() -> str:
    """A fresh run id: r_ + 24 lower-case hex characters (valid as a state thread id)."""
    return "r_" + secrets.token_hex(12)


# --- teams ------------------------------------------------------------------------------------


class TeamStore:
    """Teams of the current tenant."""

    def __init__(self, db: Database):
        self._db = db

    async def create(self, spec: TeamSpec) -> TeamRecord:
        """Store a new team; AlreadyExists if the name is taken."""
        now = time.time()
        row = TeamRow(
            id=uuid.uuid4().hex,
            name=spec.name,
            spec=json.dumps(spec.to_dict()),
            etag=uuid.uuid4().hex,
            created_at=now,
            updated_at=now,
        )
        try:
            async with self._db.session() as s:
                s.add(row)
        except IntegrityError:
            raise AlreadyExists(f"team {spec.name!r} already exists", reason="TEAM_EXISTS") from None
        return _team(row)

    async def get(self, name: str) -> TeamRecord:
        """The team called name; NotFound otherwise (also for other tenants' teams)."""
        async with self._db.raw() as tx:  # every StartRun reads its team: no ORM on this path
            row = await tx.fetchrow(
                "SELECT spec, etag, created_at, updated_at FROM orch_teams WHERE tenant_id = $1 AND name = $2",
                require_tenant().tenant_id,
                name,
            )
        if row is None:
            raise NotFound(f"team {clip(repr(name), 100)} not found", reason="TEAM_NOT_FOUND")
        return TeamRecord(TeamSpec.from_dict(json.loads(row[0])), row[1], row[2], row[3])

    async def list(self, page_size: int, page_token: str) -> Page:
        """Teams in name order, one page."""
        size = paging.page_size(page_size, maximum=200)
        after = paging.decode(page_token)
        if after is not None and not isinstance(after, str):
            raise paging.invalid_token()
        async with self._db.session() as s:
            q = select(TeamRow).order_by(TeamRow.name).limit(size + 1)
            if after:
                q = q.where(TeamRow.name > after)
            rows = list((await s.execute(q)).scalars())
        page = paging.keyset(rows, size, lambda r: r.name)
        return Page([_team(r) for r in page.items], page.next_page_token)

    async def replace(self, spec: TeamSpec, etag: str) -> TeamRecord:
        """Store spec over the team of that name; Aborted when etag is set and stale."""
        async with self._db.session() as s:
            row = (await s.execute(select(TeamRow).where(TeamRow.name == spec.name))).scalar_one_or_none()
            if row is None:
                raise NotFound(f"team {clip(repr(spec.name), 100)} not found", reason="TEAM_NOT_FOUND")
            if etag and etag != row.etag:
                raise Aborted("team changed since it was read", reason="ETAG_MISMATCH", metadata={"etag": row.etag})
            row.spec, row.etag, row.updated_at = json.dumps(spec.to_dict()), uuid.uuid4().hex, time.time()
            return _team(row)

    async def delete(self, name: str) -> None:
        """Delete the team; NotFound if there is none."""
        async with self._db.session() as s:
            row = (await s.execute(select(TeamRow).where(TeamRow.name == name))).scalar_one_or_none()
            if row is None:
                raise NotFound(f"team {clip(repr(name), 100)} not found", reason="TEAM_NOT_FOUND")
            await s.delete(row)


# --- runs -------------------------------------------------------------------------------------


class RunStore:
    """Runs of the current tenant, and the platform-wide run queue."""

    def __init__(self, db: Database, *, origin: str = ""):
        """origin: the replica's id, sent with its queue notices (services.orchestrator.wakeups)."""
        self._db, self._origin = db, origin

    async def start(
        self,
        *,
        team: TeamSpec,
        entry_agent: str,
        run_input: str,
        idempotency_key: str,
        tenant_id: str,
        principal_id: str,
        tier: str,
        grant: bytes,
        run_id: str | None = None,
        traceparent: str = "",
        lease: Lease | None = None,
        known_new: bool = False,
    ) -> tuple[RunRecord, bool, Claim | None, QueuePlace | None]:
        """Insert a queued run, then its queue entry; (run, created, claim, place).

        The run lives where the tenant's tier puts it and the queue entry in the platform database,
        so they cannot share a transaction. The run goes first: the dispatcher never sees an entry
        without its run. With an idempotency key already used by this tenant, returns that run and
        created=False (re-queueing it if it is still queued but lost its entry in a crash).

        lease: the caller's replica could execute the run now. When the queue lets the run start at
        once (fair admission would pick it now), its entry is written already leased to that replica
        and the run as RUNNING, and claim is returned: the entry goes first here, and no other
        replica looks at a leased entry before its lease expires (a crash in between leaves an entry
        without its run, dropped at its next claim). One transaction on the queue instead of four
        (queue, read the queue, claim, begin). known_new: the caller looked the idempotency key up.

        place: where a run this call queued waits, read in the transaction that queued it (None otherwise:
        the run started at once, was there already, or its place could not be read with it).
        """
        entry = dict(tenant_id=tenant_id, principal_id=principal_id, tier=tier, grant=grant, traceparent=traceparent)
        if idempotency_key and not known_new:
            existing = await self._by_key(idempotency_key)
            if existing is not None:
                return await self._requeued(existing, entry), False, None, None
        now = time.time()
        run_id = run_id or new_run_id()
        claim = await self._claim_new(run_id, now, entry, lease) if lease is not None else None
        run = RunRecord(
            run_id,
            team.name,
            team,
            entry_agent,
            run_input,
            RunStatus.RUNNING if claim is not None else RunStatus.QUEUED,
            entry_agent,
            "",
            "",
            "",
            0,
            idempotency_key,
            now,
            now,
            trace_id_of(traceparent),
        )
        # Raw statements (StartRun's path); the idempotency key's unique index settles a race with a retry.
        try:
            async with self._db.raw(write=True) as tx:
                inserted = await tx.execute(
                    f"INSERT INTO orch_runs ({_RUN_COLUMNS}, tenant_id) VALUES "
                    "($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16) "
                    "ON CONFLICT (tenant_id, idempotency_key) DO NOTHING",
                    run_id,
                    team.name,
                    json.dumps(team.to_dict()),
                    entry_agent,
                    run_input,
                    run.status.value,
                    entry_agent,
                    "",
                    "",
                    "",
                    0,
                    idempotency_key or None,
                    now,
                    now,
                    run.trace_id,
                    tenant_id,
                )
        except BaseException:
            if claim is not None:  # the leased entry has no run: let it go at once rather than at its expiry
                with contextlib.suppress(Exception):
                    await self.drop(run_id)
            raise
        if inserted != 1:
            if claim is not None:
                await self.drop(run_id)
            existing = await self._by_key(idempotency_key) if idempotency_key else None
            if existing is None:
                raise AlreadyExists(f"run {run_id!r} already exists", reason="ALREADY_EXISTS")
            return await self._requeued(existing, entry), False, None, None
        if claim is not None:
            return run, True, claim, None
        place = None
        try:
            place = await self._enqueue(run_id, now, entry)
        except IntegrityError:
            pass  # a concurrent retry with the same key found this run and queued it first: it is queued
        except BaseException:
            # Unqueued, the run would wait forever: end it so the caller's retry starts afresh.
            await self._unqueueable(run_id)
            raise
        return run, True, None, place

    async def _claim_new(self, run_id: str, now: float, entry: dict[str, Any], lease: Lease) -> Claim | None:
        """Queue a new run already leased to lease.owner when fair admission would start it now; None (and
        nothing written) when it has to wait. One transaction: read the queue, decide, write the entry.

        Most often nothing waits and the tenant is under its limit, where fair admission picks the new run
        whatever else runs: one conditional INSERT settles that case without reading the queue."""
        values = (
            run_id,
            entry["tenant_id"],
            entry["principal_id"],
            entry["tier"],
            now,
            lease.owner,
            now + lease.ttl,
            False,
            entry["grant"],
            entry["traceparent"],
        )
        # No notice: no other replica has anything to do about an entry it may not take.
        async with raw_transaction(self._db.engine, tenant_id=None, write=True) as tx:
            if lease.free_slots >= 1 and await tx.execute(
                _LEASED_IF_ALONE_SQL, *values, now, entry["tenant_id"], lease.per_tenant_limit
            ):
                return self._new_claim(run_id, entry)
            waiting, running = _queue_view(await tx.fetch(_QUEUE_SQL), now)
            me = QueuedRun(entry["tenant_id"], run_id, now)
            picks = pick_runs(
                [*waiting, me], running, per_tenant_limit=lease.per_tenant_limit, free_slots=lease.free_slots
            )
            if me not in picks:
                return None
            await tx.execute(_LEASED_SQL, *values)
        return self._new_claim(run_id, entry)

    @staticmethod
    def _new_claim(run_id: str, entry: dict[str, Any]) -> Claim:
        e = entry
        return Claim(run_id, e["tenant_id"], e["principal_id"], e["tier"], e["grant"], False, e["traceparent"])

    async def _enqueue(self, run_id: str, now: float, entry: dict[str, Any]) -> QueuePlace | None:
        """Queue a run unless it is queued already (a concurrent retry queued it first); returns where it
        waits, read in the same transaction (StartRun's answer, without a transaction of its own)."""
        async with raw_transaction(self._db.engine, tenant_id=None, write=True) as tx:
            await tx.execute(
                "INSERT INTO orch_run_queue (run_id, tenant_id, principal_id, tier, state, enqueued_at, lease_owner, "
                'lease_expires, cancel_requested, "grant", traceparent) '
                "VALUES ($1, $2, $3, $4, 'queued', $5, NULL, 0.0, $6, $7, $8) ON CONFLICT (run_id) DO NOTHING",
                run_id,
                entry["tenant_id"],
                entry["principal_id"],
                entry["tier"],
                now,
                False,
                entry["grant"],
                entry["traceparent"],
            )
            await _notify(tx, self._origin)
            rows = await tx.fetch(_PLACE_SQL, entry["tenant_id"])
        return _place_of(rows, run_id, time.time())

    async def _requeued(self, run: RunRecord, entry: dict[str, Any]) -> RunRecord:
        if run.status == RunStatus.QUEUED:
            await self._enqueue(run.run_id, run.created_at, entry)
        return run

    async def _unqueueable(self, run_id: str) -> None:
        with contextlib.suppress(Exception):
            async with self._db.session() as s:
                await s.execute(
                    update(RunRow)
                    .where(RunRow.run_id == run_id)
                    .values(
                        status=RunStatus.FAILED.value,
                        error_reason="NOT_QUEUED",
                        updated_at=time.time(),
                        error_message="the run could not be queued; start it again",
                    )
                )

    async def by_idempotency_key(self, key: str) -> RunRecord | None:
        """The run this tenant already started with idempotency key `key`, if any."""
        return await self._by_key(key)

    async def _by_key(self, key: str) -> RunRecord | None:
        async with self._db.session() as s:
            row = (await s.execute(select(RunRow).where(RunRow.idempotency_key == key))).scalar_one_or_none()
            return _run(row) if row else None

    async def get(self, run_id: str) -> RunRecord:
        """The run; NotFound otherwise (also for other tenants' runs)."""
        async with self._db.session() as s:
            row = await s.get(RunRow, run_id)
            if row is None:
                raise NotFound(f"run {run_id!r} not found", reason="RUN_NOT_FOUND")
            return _run(row)

    async def list(self, *, page_size: int, page_token: str, status: RunStatus | None, team: str) -> Page:
        """Runs newest first, filtered, one page."""
        size = paging.page_size(page_size, maximum=200)
        filters = (status.value if status is not None else "", team)
        after = paging.decode(page_token, filters=filters)
        if after is not None and not (isinstance(after, list) and len(after) == 2):
            raise paging.invalid_token()
        async with self._db.session() as s:
            q = select(RunRow).order_by(RunRow.created_at.desc(), RunRow.run_id.desc()).limit(size + 1)
            if status is not None:
                q = q.where(RunRow.status == status.value)
            if team:
                q = q.where(RunRow.team == team)
            if after:
                q = q.where(
                    (RunRow.created_at < after[0]) | ((RunRow.created_at == after[0]) & (RunRow.run_id < after[1]))
                )
            rows = list((await s.execute(q)).scalars())
        page = paging.keyset(rows, size, lambda r: [r.created_at, r.run_id], filters=filters)
        return Page([_run(r) for r in page.items], page.next_page_token)

    async def update(self, run_id: str, *, status: RunStatus | None = None, **fields: Any) -> RunRecord:
        """Change a run (checking the status transition); the queue entry goes when it finishes."""
        async with self._db.session() as s:
            row = await s.get(RunRow, run_id)
            if row is None:
                raise NotFound(f"run {run_id!r} not found", reason="RUN_NOT_FOUND")
            if status is not None:
                check_transition(RunStatus(row.status), status)
                row.status = status.value
            for k, v in fields.items():
                setattr(row, k, v)
            row.updated_at = time.time()
            run = _run(row)
        if run.status.terminal:
            await self.drop(run_id)
        return run

    async def begin(self, run_id: str) -> tuple[RunRecord, bool]:
        """Mark a claimed run RUNNING; (run, fresh). fresh: it was still QUEUED, so it never executed and its
        log in state is empty (nothing sets a run back to QUEUED). QUEUED -> RUNNING is one conditional
        statement (see cancel). A run already running or finished is returned as it is. NotFound when
        there is no such run of the current tenant."""
        tid = require_tenant().tenant_id
        async with self._db.raw(write=True) as tx:
            row = await tx.fetchrow(
                f"UPDATE orch_runs SET status = $3, updated_at = $4 WHERE run_id = $1 AND tenant_id = $2 "
                f"AND status = $5 RETURNING {_RUN_COLUMNS}",
                run_id,
                tid,
                RunStatus.RUNNING.value,
                time.time(),
                RunStatus.QUEUED.value,
            )
            if row is not None:
                return _run_raw(row), True
            row = await tx.fetchrow(
                f"SELECT {_RUN_COLUMNS} FROM orch_runs WHERE run_id = $1 AND tenant_id = $2", run_id, tid
            )
        if row is None:
            raise NotFound(f"run {run_id!r} not found", reason="RUN_NOT_FOUND")
        return _run_raw(row), False

    async def record_steps(
        self,
        run_id: str,
        steps: builtins.list[Step],
        *,
        current_agent: str,
        finished: Finished | None,
        skip_existing: bool = False,
        previous_at: float | None = None,
        drop: bool = True,
    ) -> RunRecord:
        """Keep steps (already durable in state) and the run's progress, in one transaction.

        skip_existing is for catching up after a crash, when some of the steps may be here already.
        previous_at: when the step before the batch was made, if the caller knows (saves a read).
        A finished run then leaves the queue (a leftover entry is dropped when next claimed); drop=False
        leaves that to the caller (who tells watchers first). One raw transaction (this is every step's
        path): the run's row, the steps, the new progress.
        """
        tid = require_tenant().tenant_id
        ended = None
        async with self._db.raw(write=True) as tx:
            if finished is None:  # progress only: one statement for the run, no transition to check
                row = await tx.fetchrow(
                    "UPDATE orch_runs SET current_agent = $3, updated_at = $4, "
                    "step_count = CASE WHEN step_count < $5 THEN $5 ELSE step_count END "
                    f"WHERE run_id = $1 AND tenant_id = $2 RETURNING {_RUN_COLUMNS}",
                    run_id,
                    tid,
                    current_agent,
                    time.time(),
                    steps[-1].index if steps else 0,
                )
            else:
                # A running run ends in one statement (RUNNING -> any end is always allowed); any other
                # status is read and checked below.
                ended = await tx.fetchrow(
                    "UPDATE orch_runs SET current_agent = $3, updated_at = $4, "
                    "step_count = CASE WHEN step_count < $5 THEN $5 ELSE step_count END, "
                    "status = $6, output = $7, error_reason = $8, error_message = $9 "
                    f"WHERE run_id = $1 AND tenant_id = $2 AND status = $10 RETURNING {_RUN_COLUMNS}",
                    run_id,
                    tid,
                    current_agent,
                    time.time(),
                    steps[-1].index if steps else 0,
                    RunStatus(finished.status).value,
                    finished.output,
                    finished.reason,
                    finished.message,
                    RunStatus.RUNNING.value,
                )
                row = ended or await tx.fetchrow(
                    f"SELECT {_RUN_COLUMNS} FROM orch_runs WHERE run_id = $1 AND tenant_id = $2", run_id, tid
                )
            if row is None:
                raise NotFound(f"run {run_id!r} not found", reason="RUN_NOT_FOUND")
            run = _run_raw(row)
            times: dict[int, float] = {}
            if steps and steps[0].index > 1:
                prev = steps[0].index - 1
                if previous_at is None:
                    previous_at = await tx.fetchval(
                        "SELECT created_at FROM orch_steps WHERE run_id = $1 AND tenant_id = $2 AND idx = $3",
                        run_id,
                        tid,
                        prev,
                    )
                if previous_at:
                    times[prev] = previous_at
            values = []
            for step in steps:
                latency = step_latency_ms(step, times.get(step.index - 1))
                times[step.index] = step.created_at
                values.append((run_id, tid, step.index, step.to_json().decode(), step.agent, step.created_at, latency))
            conflict = " ON CONFLICT (run_id, idx) DO NOTHING" if skip_existing else ""
            await tx.executemany(
                "INSERT INTO orch_steps (run_id, tenant_id, idx, payload, agent, created_at, latency_ms)"
                f" VALUES ($1, $2, $3, $4, $5, $6, $7){conflict}",
                values,
            )
            if finished is not None and ended is None:
                changes: dict[str, Any] = {"current_agent": current_agent, "updated_at": time.time()}
                if steps:
                    changes["step_count"] = max(run.step_count, steps[-1].index)
                if not run.status.terminal:
                    status = RunStatus(finished.status)
                    check_transition(run.status, status)
                    changes.update(
                        status=status,
                        output=finished.output,
                        error_reason=finished.reason,
                        error_message=finished.message,
                    )
                names = list(changes)
                await tx.execute(
                    f"UPDATE orch_runs SET {', '.join(f'{n} = ${i + 3}' for i, n in enumerate(names))} "
                    "WHERE run_id = $1 AND tenant_id = $2",
                    run_id,
                    tid,
                    *(v.value if isinstance(v, RunStatus) else v for v in changes.values()),
                )
                run = dataclasses.replace(run, **changes)
        if drop and finished is not None and run.status.terminal:
            await self.drop(run_id)
        return run

    async def snapshot(self, run_id: str, after: int = 0) -> tuple[RunRecord, builtins.list[Step]]:
        """The recorded steps of a run with index > after and the run as of the last of them, in one transaction.

        The steps are read before the run: a run turns terminal in the same transaction as its last step, so
        the run read after a step is at least as new as that step. When the run is finished, the steps are
        read once more (a finishing batch may have committed in between), and then they are complete.
        NotFound for a run that is not the tenant's.
        """
        tid = require_tenant().tenant_id
        sql = "SELECT idx, payload FROM orch_steps WHERE run_id = $1 AND tenant_id = $2 AND idx > $3 ORDER BY idx"
        async with self._db.raw() as tx:
            rows = list(await tx.fetch(sql, run_id, tid, after))
            row = await tx.fetchrow(
                f"SELECT {_RUN_COLUMNS} FROM orch_runs WHERE run_id = $1 AND tenant_id = $2", run_id, tid
            )
            if row is None:
                raise NotFound(f"run {run_id!r} not found", reason="RUN_NOT_FOUND")
            run = _run_raw(row)
            if run.status.terminal:
                rows += await tx.fetch(sql, run_id, tid, rows[-1][0] if rows else after)
        return run, [Step.from_json(r[1]) for r in rows]

    async def steps(self, run_id: str, after: int = 0) -> builtins.list[Step]:
        """Recorded steps of a run with index > after (the run must be the tenant's)."""
        async with self._db.session() as s:
            rows = (
                await s.execute(
                    select(StepRow.payload).where(StepRow.run_id == run_id, StepRow.idx > after).order_by(StepRow.idx)
                )
            ).scalars()
            return [Step.from_json(p) for p in rows]

    async def cancel(self, run_id: str) -> RunRecord:
        """Cancel now if queued; flag for the executor if running; no-op if finished.

        Queued -> cancelled is one conditional statement: a dispatcher starting the run at the same moment
        (begin) either finds it cancelled or has made it RUNNING first, and then it is flagged instead."""
        tid = require_tenant().tenant_id
        async with self._db.raw(write=True) as tx:
            row = await tx.fetchrow(
                "UPDATE orch_runs SET status = $3, updated_at = $4, error_message = $5 "
                f"WHERE run_id = $1 AND tenant_id = $2 AND status = $6 RETURNING {_RUN_COLUMNS}",
                run_id,
                tid,
                RunStatus.CANCELLED.value,
                time.time(),
                "cancelled by request",
                RunStatus.QUEUED.value,
            )
            cancelled = row is not None
            if row is None:
                row = await tx.fetchrow(
                    f"SELECT {_RUN_COLUMNS} FROM orch_runs WHERE run_id = $1 AND tenant_id = $2", run_id, tid
                )
            if row is None:
                raise NotFound(f"run {run_id!r} not found", reason="RUN_NOT_FOUND")
        run = _run_raw(row)
        if cancelled:
            await self.drop(run_id)
        elif run.status == RunStatus.RUNNING:
            async with self._db.system_session() as s:
                await s.execute(update(QueueRow).where(QueueRow.run_id == run_id).values(cancel_requested=True))
        return run

    # --- the platform-wide queue (system sessions only: it lives in the platform database, ----------
    # --- while a bridge or silo tenant's runs live in a schema, file or database of their own) -----

    async def waiting(self, now: float) -> tuple[builtins.list[QueuedRun], Counter[str]]:
        """Runs waiting for a slot (queued, or running under an expired lease) and live leases per tenant."""
        async with raw_transaction(self._db.engine, tenant_id=None) as tx:
            rows = await tx.fetch(_QUEUE_SQL)
        return _queue_view(rows, now)

    async def admit(
        self,
        now: float,
        owner: str,
        *,
        ttl: float,
        choose: Callable[[builtins.list[QueuedRun], Counter[str]], builtins.list[QueuedRun]],
    ) -> tuple[builtins.list[QueuedRun], Counter[str], builtins.list[Claim]]:
        """waiting() and claim() of the runs choose(waiting, running) picks, in one transaction: (waiting,
        running, the claims won). Each claim is claim()'s conditional statement, so a run another replica
        took meanwhile is simply not among the claims."""
        async with raw_transaction(self._db.engine, tenant_id=None, write=True) as tx:
            waiting, running = _queue_view(await tx.fetch(_QUEUE_SQL), now)
            claims = []
            for pick in choose(waiting, running):
                row = await tx.fetchrow(_CLAIM_SQL, pick.run_id, owner, now + ttl, now)
                if row is not None:
                    claims.append(_claim_of(row))
        return waiting, running, claims

    async def place(self, run_id: str, tenant_id: str, now: float) -> QueuePlace | None:
        """Where a run of tenant_id waits; None when it is not waiting. Reads that tenant's entries only."""
        async with raw_transaction(self._db.engine, tenant_id=None) as tx:
            rows = await tx.fetch(_PLACE_SQL, tenant_id)
        return _place_of(rows, run_id, now)

    async def claim(self, run_id: str, owner: str, *, ttl: float, now: float) -> Claim | None:
        """Take the lease of a waiting run; None when another replica got it first (one statement)."""
        async with raw_transaction(self._db.engine, tenant_id=None, write=True) as tx:
            row = await tx.fetchrow(_CLAIM_SQL, run_id, owner, now + ttl, now)
        return None if row is None else _claim_of(row)

    async def renew(self, run_id: str, owner: str, *, ttl: float, now: float) -> str:
        """Extend our lease: "ok", "cancel" (ours, but cancel was asked), "gone" (the run finished)
        or "lost" (another replica holds it now)."""
        async with self._db.system_session() as s:
            result = await s.execute(
                update(QueueRow)
                .where(QueueRow.run_id == run_id, QueueRow.lease_owner == owner, QueueRow.state == "running")
                .values(lease_expires=now + ttl)
            )
            row = (await s.execute(select(QueueRow.cancel_requested).where(QueueRow.run_id == run_id))).first()
            if row is None:
                return "gone"
            if cast("CursorResult[Any]", result).rowcount != 1:
                return "lost"
            return "cancel" if row[0] else "ok"

    async def renew_many(self, run_ids: builtins.list[str], owner: str, *, ttl: float, now: float) -> dict[str, str]:
        """renew() for many runs of one owner in one transaction: run id -> "ok", "cancel", "gone" or "lost"."""
        marks = ", ".join(f"${i + 4}" for i in range(len(run_ids)))
        async with raw_transaction(self._db.engine, tenant_id=None, write=True) as tx:
            await tx.execute(
                "UPDATE orch_run_queue SET lease_expires = $2 WHERE lease_owner = $1 AND state = $3 "
                f"AND run_id IN ({marks})",
                owner,
                now + ttl,
                "running",
                *run_ids,
            )
            rows = await tx.fetch(
                "SELECT run_id, lease_owner, state, cancel_requested FROM orch_run_queue WHERE run_id IN "
                f"({', '.join(f'${i + 1}' for i in range(len(run_ids)))})",
                *run_ids,
            )
        found = {r[0]: r for r in rows}
        outcomes = {}
        for run_id in run_ids:
            row = found.get(run_id)
            if row is None:
                outcomes[run_id] = "gone"
            elif row[1] != owner or row[2] != "running":
                outcomes[run_id] = "lost"
            else:
                outcomes[run_id] = "cancel" if row[3] else "ok"
        return outcomes

    async def release(self, run_id: str, owner: str, *, retry_after: float = 0.0) -> None:
        """Give a lease back without finishing (shutdown): the run waits for the next claim.

        retry_after > 0: the lease is kept, with nothing executing it, until then; the run is claimed again (by
        any replica, as an expired lease) only after that (a dependency was down)."""
        async with raw_transaction(self._db.engine, tenant_id=None, write=True) as tx:
            if retry_after > 0:
                await tx.execute(
                    "UPDATE orch_run_queue SET lease_expires = $3 WHERE run_id = $1 AND lease_owner = $2",
                    run_id,
                    owner,
                    time.time() + retry_after,
                )
                return
            await tx.execute(
                "UPDATE orch_run_queue SET state = 'queued', lease_owner = NULL, lease_expires = 0.0 "
                "WHERE run_id = $1 AND lease_owner = $2",
                run_id,
                owner,
            )
            await _notify(tx, self._origin)

    async def drop(self, run_id: str) -> None:
        """Remove a queue entry whose run can no longer be executed."""
        async with raw_transaction(self._db.engine, tenant_id=None, write=True) as tx:
            # A slot of its tenant is free: another replica may start a waiting run (a notice when a row went).
            if tx.dialect == "postgresql":  # the delete and its notice in one round trip
                await tx.execute(
                    "WITH gone AS (DELETE FROM orch_run_queue WHERE run_id = $1 RETURNING 1) "
                    f"SELECT pg_notify('{QUEUE_CHANNEL}', $2) FROM gone LIMIT 1",
                    run_id,
                    self._origin,
                )
            elif await tx.execute("DELETE FROM orch_run_queue WHERE run_id = $1", run_id):
                await _notify(tx, self._origin)
