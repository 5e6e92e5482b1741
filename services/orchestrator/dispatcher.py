"""Runs queued runs: fair admission, leases with heartbeat, execution as the run's tenant.

One Dispatcher per replica. It admits runs with scheduler.pick_runs over the platform-wide
queue (so limits hold across replicas), takes each run's lease, and executes it with the run's
own delegated token bound as the TenantContext. A heartbeat renews the lease; if the lease is
lost the execution stops, and a run whose holder died is claimed again once its lease expires.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from services.orchestrator.engine import Engine, Ports, RunJob
from services.orchestrator.grants import GrantSealer
from services.orchestrator.history import RunView
from services.orchestrator.ports import StepConflict
from services.orchestrator.runs import RunStatus
from services.orchestrator.scheduler import pick_runs
from services.orchestrator.steps import Step, StepKind
from services.orchestrator.store import Claim, RunRecord, RunStore
from shared.errors import Unauthenticated, Unavailable
from shared.tenancy import TenantContext, tenant_scope

log = logging.getLogger("bulkhead.orchestrator.dispatcher")


class StepFeed:
    """Live steps of the runs executing on this replica, for WatchRun streams on it (others poll the DB)."""

    def __init__(self) -> None:
        self._subscribers: dict[str, set[asyncio.Queue]] = {}

    def publish(self, run_id: str, step: Step, run: RunRecord | None) -> None:
        """A step of run_id was recorded (run is the run as of that step, None if unknown)."""
        for queue in self._subscribers.get(run_id, ()):
            queue.put_nowait((step, run))

    @contextlib.contextmanager
    def subscribe(self, run_id: str) -> Iterator[asyncio.Queue]:
        """A queue of (step, run) for run_id while the block runs; subscribe before reading the DB."""
        queue: asyncio.Queue = asyncio.Queue()
        self._subscribers.setdefault(run_id, set()).add(queue)
        try:
            yield queue
        finally:
            subs = self._subscribers.get(run_id)
            if subs is not None:
                subs.discard(queue)
                if not subs:
                    del self._subscribers[run_id]


@dataclass(frozen=True)
class DispatchSettings:
    """Limits and timings of one replica."""

    runs_per_tenant: int = 4
    """Concurrent runs per tenant (across replicas)."""
    max_concurrent: int = 64
    """Runs this replica executes at once."""
    lease_seconds: float = 15.0
    """Lease length; heartbeats every third of it."""
    poll_seconds: float = 1.0
    """How often the queue is looked at without a wake-up."""


class Dispatcher:
    """Admits, leases and executes runs."""

    def __init__(self, *, runs: RunStore, engine: Engine, ports_for: Callable[[], Ports], sealer: GrantSealer,
                 feed: StepFeed, settings: DispatchSettings = DispatchSettings(), owner: str | None = None):
        self._runs, self._engine, self._ports_for, self._sealer = runs, engine, ports_for, sealer
        self._feed, self._s = feed, settings
        self.owner = owner or f"orch-{uuid.uuid4().hex[:12]}"
        self._wake = asyncio.Event()
        self._tasks: dict[str, asyncio.Task] = {}
        self._cancel: set[str] = set()
        self._loop_task: asyncio.Task | None = None

    def start(self) -> None:
        """Begin dispatching in the background."""
        self._loop_task = asyncio.create_task(self._loop(), name="orchestrator-dispatch")

    def wake(self) -> None:
        """Look at the queue now (a run was queued or finished)."""
        self._wake.set()

    def cancel_local(self, run_id: str) -> None:
        """Stop a run executing here before its next step."""
        if run_id in self._tasks:
            self._cancel.add(run_id)

    async def stop(self) -> None:
        """Stop dispatching; running executions give their leases back for the next replica."""
        if self._loop_task:
            self._loop_task.cancel()
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), *( [self._loop_task] if self._loop_task else []),
                             return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            try:
                await self._admit()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the database may be briefly away; try again next tick
                log.exception("dispatch round failed")
            try:
                await asyncio.wait_for(self._wake.wait(), self._s.poll_seconds)
            except TimeoutError:
                pass
            self._wake.clear()

    async def _admit(self) -> None:
        free = self._s.max_concurrent - len(self._tasks)
        if free <= 0:
            return
        now = time.time()
        waiting, running = await self._runs.waiting(now)
        waiting = [w for w in waiting if w.run_id not in self._tasks]
        for pick in pick_runs(waiting, running, per_tenant_limit=self._s.runs_per_tenant, free_slots=free):
            claim = await self._runs.claim(pick.run_id, self.owner, ttl=self._s.lease_seconds, now=time.time())
            if claim is not None:
                if claim.cancel_requested:
                    self._cancel.add(claim.run_id)
                self._tasks[claim.run_id] = asyncio.create_task(self._execute(claim), name=f"run-{claim.run_id}")

    async def _execute(self, claim: Claim) -> None:
        try:
            token = self._sealer.open(claim.grant, claim.run_id)
        except Exception:  # noqa: BLE001 - a grant that does not open can never run
            log.error("run grant unreadable", extra={"tenant_id": claim.tenant_id, "run_id": claim.run_id})
            await self._runs.drop(claim.run_id)
            self._done(claim.run_id)
            return
        ctx = TenantContext(tenant_id=claim.tenant_id, principal_id=claim.principal_id, tier=claim.tier,
                            token=token, run_id=claim.run_id, request_id=claim.run_id)
        heartbeat: asyncio.Task | None = None
        try:
            with tenant_scope(ctx):
                run = await self._runs.get(claim.run_id)
                if run.status.terminal:
                    await self._runs.drop(claim.run_id)
                    return
                if run.status != RunStatus.RUNNING:
                    await self._runs.update(claim.run_id, status=RunStatus.RUNNING)
                me = asyncio.current_task()
                heartbeat = asyncio.create_task(self._heartbeat(claim.run_id, me))
                job = RunJob(run_id=run.run_id, tenant_id=claim.tenant_id, team=run.team_spec,
                             entry_agent=run.entry_agent, run_input=run.input)
                recorder = _Recorder(self._runs, self._feed, claim.run_id)
                try:
                    await self._engine.execute(job, self._ports_for(),
                                               cancelled=lambda: claim.run_id in self._cancel,
                                               on_step=recorder.put, on_load=self._syncer(claim.run_id))
                finally:
                    await recorder.close()
        except StepConflict:
            log.warning("run lease lost", extra={"tenant_id": claim.tenant_id, "run_id": claim.run_id})
        except asyncio.CancelledError:
            await asyncio.shield(self._runs.release(claim.run_id, self.owner))
        except Unauthenticated:
            await self._fail(ctx, claim.run_id, "DELEGATION_EXPIRED",
                             "the run's delegated token expired before it could finish")
        except Unavailable:
            log.warning("run paused: a dependency is unavailable", extra={"tenant_id": claim.tenant_id,
                                                                          "run_id": claim.run_id})
            await self._runs.release(claim.run_id, self.owner)
        except Exception:  # noqa: BLE001 - record the failure on the run rather than retry forever
            log.exception("run failed", extra={"tenant_id": claim.tenant_id, "run_id": claim.run_id})
            await self._fail(ctx, claim.run_id, "INTERNAL", "the run failed inside the orchestrator")
        finally:
            if heartbeat is not None:
                heartbeat.cancel()
            self._done(claim.run_id)

    def _done(self, run_id: str) -> None:
        self._tasks.pop(run_id, None)
        self._cancel.discard(run_id)
        self._wake.set()

    async def _fail(self, ctx: TenantContext, run_id: str, reason: str, message: str) -> None:
        with tenant_scope(ctx):
            try:
                await self._runs.update(run_id, status=RunStatus.FAILED, error_reason=reason, error_message=message)
            except Exception:  # noqa: BLE001
                log.exception("could not record run failure", extra={"run_id": run_id})
        self._feed.publish(run_id, Step(0, StepKind.RUN_FINISHED, ""), None)

    def _syncer(self, run_id: str):
        async def on_load(steps: list[Step], view: RunView) -> None:
            # Steps a dead replica appended to state but never recorded here (killed in between),
            # including, possibly, the run's end.
            run = await self._runs.record_steps(run_id, steps, current_agent=view.current_agent,
                                                finished=view.finished, skip_existing=True)
            self._feed.publish(run_id, steps[-1], run)
        return on_load

    async def _heartbeat(self, run_id: str, task: asyncio.Task | None) -> None:
        interval = self._s.lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            try:
                ours, cancel = await self._runs.renew(run_id, self.owner, ttl=self._s.lease_seconds, now=time.time())
            except Exception:  # noqa: BLE001 - keep trying until the lease would expire
                log.warning("lease renewal failed", extra={"run_id": run_id})
                continue
            if cancel:
                self._cancel.add(run_id)
            if not ours and task is not None:
                log.warning("lease taken over, stopping", extra={"run_id": run_id})
                task.cancel()
                return


class _Recorder:
    """Copies a run's steps into the orchestrator's tables off the run's critical path.

    State already holds each step durably before the engine moves on; this copy (for GetRun,
    ListRuns and WatchRun) is written in order, in batches, while the next step executes. If
    the process dies first, the next execution catches up from state (Dispatcher._syncer).
    """

    def __init__(self, runs: RunStore, feed: StepFeed, run_id: str):
        self._runs, self._feed, self._run_id = runs, feed, run_id
        self._queue: asyncio.Queue = asyncio.Queue()
        self._task = asyncio.create_task(self._loop(), name=f"record-{run_id}")

    async def put(self, step: Step, view: RunView) -> None:
        """Queue a step (the engine's on_step)."""
        finished = view.finished if step.kind == StepKind.RUN_FINISHED else None
        self._queue.put_nowait((step, view.current_agent, finished))

    async def close(self) -> None:
        """Write what is queued, then stop."""
        self._queue.put_nowait(None)
        await asyncio.shield(self._task)

    async def _loop(self) -> None:
        done = False
        while not done:
            batch = [await self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            if batch[-1] is None:
                done = True
                batch.pop()
            if not batch:
                continue
            steps = [b[0] for b in batch]
            try:
                run = await self._runs.record_steps(self._run_id, steps, current_agent=batch[-1][1],
                                                    finished=next((b[2] for b in batch if b[2] is not None), None))
            except Exception:  # noqa: BLE001 - state has the steps; the next execution catches up
                log.exception("recording steps failed", extra={"run_id": self._run_id})
                continue
            for step in steps:
                self._feed.publish(self._run_id, step, run)
