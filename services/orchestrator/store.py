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
import json
import secrets
import time
import uuid
from collections import Counter
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
    Table,
    Text,
    UniqueConstraint,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column

from services.orchestrator.history import Finished
from services.orchestrator.runs import RunStatus, check_transition
from services.orchestrator.scheduler import QueuedRun
from services.orchestrator.steps import Step, StepKind
from services.orchestrator.team import TeamSpec
from shared import paging
from shared.db import Base, Database, TenantOwned
from shared.errors import Aborted, AlreadyExists, NotFound, clip
from shared.paging import Page


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
    __table_args__ = (UniqueConstraint("tenant_id", "idempotency_key", name="uq_orch_runs_tenant_idem"),
                      Index("ix_orch_runs_tenant_created", "tenant_id", "created_at"))
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
class QueuePlace:
    """Why a queued run has not started yet, within its own tenant."""

    position: int
    """Its place among the tenant's waiting runs, from 1."""
    running: int
    """The tenant's runs holding a live lease."""


def _team(row: TeamRow) -> TeamRecord:
    return TeamRecord(TeamSpec.from_dict(json.loads(row.spec)), row.etag, row.created_at, row.updated_at)


def _run(row: RunRow) -> RunRecord:
    return RunRecord(row.run_id, row.team, TeamSpec.from_dict(json.loads(row.team_spec)), row.entry_agent, row.input,
                     RunStatus(row.status), row.current_agent, row.output, row.error_reason, row.error_message,
                     row.step_count, row.idempotency_key or "", row.created_at, row.updated_at, row.trace_id or "")


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
        row = TeamRow(id=uuid.uuid4().hex, name=spec.name, spec=json.dumps(spec.to_dict()), etag=uuid.uuid4().hex,
                      created_at=now, updated_at=now)
        try:
            async with self._db.session() as s:
                s.add(row)
        except IntegrityError:
            raise AlreadyExists(f"team {spec.name!r} already exists", reason="TEAM_EXISTS") from None
        return _team(row)

    async def get(self, name: str) -> TeamRecord:
        """The team called name; NotFound otherwise (also for other tenants' teams)."""
        async with self._db.session() as s:
            row = (await s.execute(select(TeamRow).where(TeamRow.name == name))).scalar_one_or_none()
            if row is None:
                raise NotFound(f"team {clip(repr(name), 100)} not found", reason="TEAM_NOT_FOUND")
            return _team(row)

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

    def __init__(self, db: Database):
        self._db = db

    async def create(self, *, team: TeamSpec, entry_agent: str, run_input: str, idempotency_key: str,
                     tenant_id: str, principal_id: str, tier: str, grant: bytes,
                     run_id: str | None = None, traceparent: str = "") -> tuple[RunRecord, bool]:
        """Insert a queued run, then its queue entry; (run, created).

        The run lives where the tenant's tier puts it and the queue entry in the platform database,
        so they cannot share a transaction. The run goes first: the dispatcher never sees an entry
        without its run. With an idempotency key already used by this tenant, returns that run and
        created=False (re-queueing it if it is still queued but lost its entry in a crash).
        """
        entry = dict(tenant_id=tenant_id, principal_id=principal_id, tier=tier, grant=grant, traceparent=traceparent)
        if idempotency_key:
            existing = await self._by_key(idempotency_key)
            if existing is not None:
                return await self._requeued(existing, entry), False
        now = time.time()
        run_id = run_id or new_run_id()
        row = RunRow(run_id=run_id, team=team.name, team_spec=json.dumps(team.to_dict()), entry_agent=entry_agent,
                     input=run_input, status=RunStatus.QUEUED.value, current_agent=entry_agent, output="",
                     error_reason="", error_message="", step_count=0, idempotency_key=idempotency_key or None,
                     created_at=now, updated_at=now, trace_id=trace_id_of(traceparent))
        try:
            async with self._db.session() as s:
                s.add(row)
        except IntegrityError:
            existing = await self._by_key(idempotency_key) if idempotency_key else None
            if existing is None:
                raise
            return await self._requeued(existing, entry), False
        try:
            await self._enqueue(run_id, now, entry)
        except IntegrityError:
            pass  # a concurrent retry with the same key found this run and queued it first: it is queued
        except BaseException:
            # Unqueued, the run would wait forever: end it so the caller's retry starts afresh.
            await self._unqueueable(run_id)
            raise
        return _run(row), True

    async def _enqueue(self, run_id: str, now: float, entry: dict[str, Any]) -> None:
        async with self._db.system_session() as s:
            if await s.get(QueueRow, run_id) is None:
                s.add(QueueRow(run_id=run_id, state="queued", enqueued_at=now, lease_owner=None, lease_expires=0.0,
                               cancel_requested=False, **entry))

    async def _requeued(self, run: RunRecord, entry: dict[str, Any]) -> RunRecord:
        if run.status == RunStatus.QUEUED:
            with contextlib.suppress(IntegrityError):  # a concurrent retry queued it
                await self._enqueue(run.run_id, run.created_at, entry)
        return run

    async def _unqueueable(self, run_id: str) -> None:
        with contextlib.suppress(Exception):
            async with self._db.session() as s:
                await s.execute(update(RunRow).where(RunRow.run_id == run_id).values(
                    status=RunStatus.FAILED.value, error_reason="NOT_QUEUED", updated_at=time.time(),
                    error_message="the run could not be queued; start it again"))

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
                q = q.where((RunRow.created_at < after[0]) |
                            ((RunRow.created_at == after[0]) & (RunRow.run_id < after[1])))
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

    async def record_steps(self, run_id: str, steps: builtins.list[Step], *, current_agent: str,
                           finished: Finished | None, skip_existing: bool = False) -> RunRecord:
        """Keep steps (already durable in state) and the run's progress, in one transaction.

        skip_existing is for catching up after a crash, when some of the steps may be here already.
        A finished run then leaves the queue (a leftover entry is dropped when next claimed).
        """
        async with self._db.session() as s:
            row = await s.get(RunRow, run_id)
            if row is None:
                raise NotFound(f"run {run_id!r} not found", reason="RUN_NOT_FOUND")
            have: set[int] = set()
            if skip_existing:
                have = set((await s.execute(select(StepRow.idx).where(StepRow.run_id == run_id))).scalars())
            times = await self._times_before(s, run_id, steps)
            for step in steps:
                times[step.index] = step.created_at
                if step.index not in have:
                    latency = step_latency_ms(step, times.get(step.index - 1))
                    s.add(StepRow(run_id=run_id, idx=step.index, payload=step.to_json().decode(), agent=step.agent,
                                  created_at=step.created_at, latency_ms=latency))
            if steps:
                row.step_count = max(row.step_count, steps[-1].index)
            row.current_agent = current_agent
            if finished is not None and not RunStatus(row.status).terminal:
                status = RunStatus(finished.status)
                check_transition(RunStatus(row.status), status)
                row.status, row.output = status.value, finished.output
                row.error_reason, row.error_message = finished.reason, finished.message
            row.updated_at = time.time()
            run = _run(row)
        if finished is not None and run.status.terminal:
            await self.drop(run_id)
        return run

    @staticmethod
    async def _times_before(s: Any, run_id: str, steps: builtins.list[Step]) -> dict[int, float]:
        """{index: created_at} of the stored step just before the batch, for the first one's latency."""
        if not steps or steps[0].index <= 1:
            return {}
        prev = steps[0].index - 1
        at = (await s.execute(select(StepRow.created_at).where(StepRow.run_id == run_id, StepRow.idx == prev)))
        value = at.scalar_one_or_none()
        return {prev: value} if value else {}

    async def steps(self, run_id: str, after: int = 0) -> builtins.list[Step]:
        """Recorded steps of a run with index > after (the run must be the tenant's)."""
        async with self._db.session() as s:
            rows = (await s.execute(select(StepRow.payload).where(StepRow.run_id == run_id, StepRow.idx > after)
                                    .order_by(StepRow.idx))).scalars()
            return [Step.from_json(p) for p in rows]

    async def cancel(self, run_id: str) -> RunRecord:
        """Cancel now if queued; flag for the executor if running; no-op if finished."""
        async with self._db.session() as s:
            row = await s.get(RunRow, run_id)
            if row is None:
                raise NotFound(f"run {run_id!r} not found", reason="RUN_NOT_FOUND")
            status = RunStatus(row.status)
            if status == RunStatus.QUEUED:
                row.status, row.updated_at = RunStatus.CANCELLED.value, time.time()
                row.error_message = "cancelled by request"
            run = _run(row)
        if status == RunStatus.QUEUED:
            await self.drop(run_id)
        elif status == RunStatus.RUNNING:
            async with self._db.system_session() as s:
                await s.execute(update(QueueRow).where(QueueRow.run_id == run_id).values(cancel_requested=True))
        return run

    # --- the platform-wide queue (system sessions only: it lives in the platform database, ----------
    # --- while a bridge or silo tenant's runs live in a schema, file or database of their own) -----

    async def waiting(self, now: float) -> tuple[builtins.list[QueuedRun], Counter[str]]:
        """Runs waiting for a slot (queued, or running under an expired lease) and live leases per tenant."""
        async with self._db.system_session() as s:
            rows = list((await s.execute(select(QueueRow.run_id, QueueRow.tenant_id, QueueRow.state,
                                                QueueRow.enqueued_at, QueueRow.lease_expires))).all())
        running: Counter[str] = Counter()
        waiting: builtins.list[QueuedRun] = []
        for run_id, tenant_id, state, enqueued_at, expires in rows:
            if state == "running" and expires > now:
                running[tenant_id] += 1
            else:
                waiting.append(QueuedRun(tenant_id, run_id, enqueued_at))
        return waiting, running

    async def place(self, run_id: str, tenant_id: str, now: float) -> QueuePlace | None:
        """Where a run of tenant_id waits; None when it is not waiting. Reads that tenant's entries only."""
        async with self._db.system_session() as s:
            rows = (await s.execute(select(QueueRow.run_id, QueueRow.state, QueueRow.enqueued_at,
                                           QueueRow.lease_expires).where(QueueRow.tenant_id == tenant_id))).all()
        live = [r for r in rows if r.state == "running" and r.lease_expires > now]
        waiting = sorted((r for r in rows if r not in live), key=lambda r: (r.enqueued_at, r.run_id))
        ids = [r.run_id for r in waiting]
        if run_id not in ids:
            return None
        return QueuePlace(position=ids.index(run_id) + 1, running=len(live))

    async def claim(self, run_id: str, owner: str, *, ttl: float, now: float) -> Claim | None:
        """Take the lease of a waiting run; None when another replica got it first."""
        async with self._db.system_session() as s:
            result = await s.execute(
                update(QueueRow).where(QueueRow.run_id == run_id)
                .where((QueueRow.state == "queued") | (QueueRow.lease_expires <= now))
                .values(state="running", lease_owner=owner, lease_expires=now + ttl))
            if cast("CursorResult[Any]", result).rowcount != 1:  # an UPDATE's result is a CursorResult
                return None
            row = await s.get_one(QueueRow, run_id)
            return Claim(row.run_id, row.tenant_id, row.principal_id, row.tier, row.grant, row.cancel_requested,
                         row.traceparent or "")

    async def renew(self, run_id: str, owner: str, *, ttl: float, now: float) -> str:
        """Extend our lease: "ok", "cancel" (ours, but cancel was asked), "gone" (the run finished)
        or "lost" (another replica holds it now)."""
        async with self._db.system_session() as s:
            result = await s.execute(
                update(QueueRow).where(QueueRow.run_id == run_id, QueueRow.lease_owner == owner,
                                       QueueRow.state == "running")
                .values(lease_expires=now + ttl))
            row = (await s.execute(select(QueueRow.cancel_requested).where(QueueRow.run_id == run_id))).first()
            if row is None:
                return "gone"
            if cast("CursorResult[Any]", result).rowcount != 1:
                return "lost"
            return "cancel" if row[0] else "ok"

    async def release(self, run_id: str, owner: str) -> None:
        """Give a lease back without finishing (shutdown): the run waits for the next claim."""
        async with self._db.system_session() as s:
            await s.execute(update(QueueRow).where(QueueRow.run_id == run_id, QueueRow.lease_owner == owner)
                            .values(state="queued", lease_owner=None, lease_expires=0.0))

    async def drop(self, run_id: str) -> None:
        """Remove a queue entry whose run can no longer be executed."""
        async with self._db.system_session() as s:
            await s.execute(cast(Table, QueueRow.__table__).delete().where(QueueRow.run_id == run_id))
