"""Runs queued runs: fair admission, leases with heartbeat, execution as the run's tenant.

One Dispatcher per replica. It admits runs with scheduler.pick_runs over the platform-wide
queue (so limits hold across replicas), takes each run's lease, and executes it with the run's
own delegated token bound as the TenantContext. A heartbeat renews the leases (all of this
replica's in one statement); if a lease is
lost the execution stops, and a run whose holder died is claimed again once its lease expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from services.orchestrator.engine import Engine, Ports, RunJob, TenantSuspended
from services.orchestrator.grants import GrantSealer
from services.orchestrator.history import RunView
from services.orchestrator.ports import StepConflict, suspended_refusal
from services.orchestrator.runs import RunStatus
from services.orchestrator.scheduler import QueuedRun, pick_runs
from services.orchestrator.steps import Step, StepKind
from services.orchestrator.store import Claim, Lease, RunRecord, RunStore
from shared.errors import NotFound, Unauthenticated, Unavailable
from shared.telemetry import attach_traceparent, detach
from shared.tenancy import TenantContext, tenant_scope

log = logging.getLogger("bulkhead.orchestrator.dispatcher")


_REFUSED_TOKEN = {
    "TOKEN_EXPIRED": ("DELEGATION_EXPIRED", "the run's delegated token expired before it could finish"),
    "TOKEN_REVOKED": ("DELEGATION_REVOKED", "the run's delegated token was revoked"),
}
"""How a refused delegated token ends a run, by the refusal's reason."""


class WatchQueue(asyncio.Queue):
    """One WatchRun stream's queue of (step, run) for its run (see StepFeed.subscribe)."""

    def __init__(self) -> None:
        super().__init__()
        self.queued = False
        """The stream waits for its queued run to start: the dispatcher's look at the queue nudges it
        (None, None) once the run is neither waiting in the queue nor executing here, so the stream
        need not read the database on a timer meanwhile."""


class _Backlog(list[tuple[Step, "RunRecord | None"]]):
    """The steps one execution here made, in order; complete from step 1 for an execution of a fresh run."""

    def __init__(self, tenant_id: str = "") -> None:
        super().__init__()
        self.tenant_id = tenant_id
        """The run's tenant when every step of the run is here ("" when earlier steps are elsewhere)."""


class StepFeed:
    """Live steps of the runs executing on this replica, for WatchRun streams on it (others poll the DB)."""

    MAX_EXPECTED = 10_000
    """Queued runs remembered by expect() at most (the oldest are forgotten: their streams read the database)."""

    def __init__(self) -> None:
        self._subscribers: dict[str, set[WatchQueue]] = {}
        self._backlog: dict[str, _Backlog] = {}
        self._expected: dict[str, tuple[str, float]] = {}
        """Fresh runs queued by a StartRun here that have not left the queue since: their tenant, and when
        (time.monotonic()) they were expected."""

    def expect(self, run_id: str, tenant_id: str) -> None:
        """A StartRun here queued a fresh run of tenant_id: it has no step anywhere until it leaves the queue."""
        self._expected[run_id] = (tenant_id, time.monotonic())
        if len(self._expected) > self.MAX_EXPECTED:
            del self._expected[next(iter(self._expected))]

    def expected(self, run_id: str, tenant_id: str) -> bool:
        """Whether run_id, a run of tenant_id, is a fresh run queued here that has not left the queue (as far as
        this replica knows: the dispatcher's look nudges its streams when it has). False for another tenant."""
        entry = self._expected.get(run_id)
        return entry is not None and entry[0] == tenant_id

    def prune_expected(self, queued: set[str], looked_at: float) -> None:
        """Forget the expected runs no longer in the queue: queued holds the run ids waiting at a look at it
        begun at looked_at (time.monotonic()); a run expected since may have been queued after that look."""
        gone = [r for r, (_, at) in self._expected.items() if at < looked_at and r not in queued]
        for run_id in gone:
            del self._expected[run_id]

    def open(self, run_id: str, tenant_id: str) -> None:
        """A fresh run (no step anywhere yet) of tenant_id starts executing here: all its steps will be in the feed."""
        self._expected.pop(run_id, None)
        self._backlog[run_id] = _Backlog(tenant_id)

    def complete(self, run_id: str, tenant_id: str) -> bool:
        """Whether every step of run_id, a run of tenant_id, reaches this feed (from step 1): a stream subscribed
        now needs nothing from the database. False for another tenant's run (its stream reads the database in
        its own tenant, and finds nothing)."""
        backlog = self._backlog.get(run_id)
        return backlog is not None and bool(backlog.tenant_id) and backlog.tenant_id == tenant_id

    def publish(self, run_id: str, step: Step, run: RunRecord | None) -> None:
        """A step of run_id happened (run is the run as of that step, None if unknown)."""
        if step.index:
            backlog = self._backlog.get(run_id)
            if backlog is None:
                backlog = self._backlog[run_id] = _Backlog()
            backlog.append((step, run))
        for queue in self._subscribers.get(run_id, ()):
            queue.put_nowait((step, run))

    def forget(self, run_id: str) -> None:
        """The run stopped executing here: drop its backlog."""
        self._backlog.pop(run_id, None)
        self._expected.pop(run_id, None)

    def nudge(self, run_id: str) -> None:
        """The run's execution here ended (finished or given back), or it left the queue other than by starting
        here: its watchers read the database again."""
        self._expected.pop(run_id, None)
        for queue in self._subscribers.get(run_id, ()):
            queue.put_nowait((None, None))

    def queued_watched(self) -> list[str]:
        """Runs a stream waits on to leave the queue (WatchQueue.queued)."""
        return [run_id for run_id, subs in self._subscribers.items() if any(w.queued for w in subs)]

    @contextlib.contextmanager
    def subscribe(self, run_id: str) -> Iterator[WatchQueue]:
        """A queue of (step, run) for run_id while the block runs; subscribe before reading the DB.
        (None, None) on it means the execution here ended, or the run left the queue: read the DB."""
        queue = WatchQueue()
        for item in self._backlog.get(run_id, ()):  # steps this execution made before the watcher came
            queue.put_nowait(item)
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
    outage_backoff: tuple[float, float] = (1.0, 30.0)
    """(first, most): a run that met an unavailable dependency waits `first` seconds before its next claim,
    twice as long after each further time in a row, at most `most` (an outage is not a loop of claims)."""


class Dispatcher:
    """Admits, leases and executes runs."""

    def __init__(
        self,
        *,
        runs: RunStore,
        engine: Engine,
        ports_for: Callable[[], Ports],
        sealer: GrantSealer,
        feed: StepFeed,
        settings: DispatchSettings = DispatchSettings(),
        owner: str | None = None,
        suspended: Callable[[str], bool] = lambda tenant_id: False,
    ):
        """suspended: whether a tenant is suspended now (the verifier's view): its runs pause, unclaimed."""
        self._runs, self._engine, self._ports_for, self._sealer = runs, engine, ports_for, sealer
        self._suspended = suspended
        self._feed, self._s = feed, settings
        self.owner = owner or f"orch-{uuid.uuid4().hex[:12]}"
        self._wake = asyncio.Event()
        self._tasks: dict[str, asyncio.Task] = {}
        self._cancel: set[str] = set()
        self._loop_task: asyncio.Task | None = None
        self._heartbeat_task: asyncio.Task | None = None
        self._stopping = asyncio.Event()
        self._reserved = 0
        """Slots promised to StartRun calls that may start their run at once (lease_for_new_run)."""
        self._held: Counter[str] = Counter()
        """Per tenant, its runs executing here plus the slots promised to its StartRun calls."""
        self._tenant_of: dict[str, str] = {}
        """The tenant of each run executing here."""
        self._more_waiting = True
        """The last look at the queue left runs waiting (or did not look): a freed slot may start one."""
        self._outages: OrderedDict[str, int] = OrderedDict()
        """Per run, how many executions in a row here met an unavailable dependency (bounded: a run that
        moved to another replica is forgotten eventually)."""

    @property
    def runs_per_tenant(self) -> int:
        """Concurrent runs per tenant (across replicas): the tenant's concurrency limit."""
        return self._s.runs_per_tenant

    def start(self) -> None:
        """Begin dispatching in the background."""
        self._loop_task = asyncio.create_task(self._loop(), name="orchestrator-dispatch")
        self._heartbeat_task = asyncio.create_task(self._heartbeats(), name="orchestrator-leases")

    def wake(self) -> None:
        """Look at the queue now (a run was queued or finished)."""
        self._wake.set()

    @property
    def watches_queue(self) -> bool:
        """Whether this replica looks at the queue (dispatching), nudging streams of runs that left it."""
        return self._loop_task is not None and not self._loop_task.done()

    def lease_for_new_run(self, tenant_id: str) -> Lease | None:
        """A slot of this replica for a run being started here, to start at once if the queue lets it
        (RunStore.start); None when there is none. Hand it back with adopt() or unreserve()."""
        free = self._s.max_concurrent - len(self._tasks) - self._reserved
        # Runs left waiting at the last look wait for their tenant's limit: a new one most likely waits too,
        # and is queued without first asking (the dispatcher's next look starts whatever may start). So does
        # one whose tenant holds its limit here already (executing, or promised to its other StartRun calls):
        # leases count across replicas, so it could not start now either, and asking costs a transaction.
        if (
            free <= 0
            or self._more_waiting
            or not self.watches_queue
            or self._held[tenant_id] >= self._s.runs_per_tenant
            or self._suspended(tenant_id)
        ):
            return None
        self._reserved += 1
        self._held[tenant_id] += 1
        return Lease(self.owner, self._s.lease_seconds, self._s.runs_per_tenant, free)

    def unreserve(self, tenant_id: str) -> None:
        """Give back a slot from lease_for_new_run that was not used."""
        self._reserved -= 1
        self._release_held(tenant_id)

    async def adopt(self, claim: Claim, run: RunRecord) -> None:
        """Execute a run whose lease a StartRun here took (RunStore.start), using the slot it reserved; if
        dispatching stopped meanwhile, give the lease back for another replica (as stop() does)."""
        self._reserved -= 1
        if not self.watches_queue:
            self._release_held(claim.tenant_id)
            await self._runs.release(claim.run_id, self.owner)
            return
        self._tenant_of[claim.run_id] = claim.tenant_id
        self._tasks[claim.run_id] = asyncio.create_task(self._execute(claim, run), name=f"run-{claim.run_id}")

    def _release_held(self, tenant_id: str) -> None:
        self._held[tenant_id] -= 1
        if self._held[tenant_id] <= 0:
            del self._held[tenant_id]

    def executing(self, run_id: str) -> bool:
        """Whether the run executes on this replica now (its steps all reach the live feed)."""
        return run_id in self._tasks

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
        await asyncio.gather(
            *self._tasks.values(), *([self._loop_task] if self._loop_task else []), return_exceptions=True
        )
        if self._heartbeat_task is not None:
            # Let a renewal in progress finish: cancelling it mid-query would upset the pool.
            self._stopping.set()
            await asyncio.wait({self._heartbeat_task}, timeout=5)
            self._heartbeat_task.cancel()

    async def _loop(self) -> None:
        while True:
            try:
                await self._admit()
            except asyncio.CancelledError:
                raise
            except Exception:  # the database may be briefly away; try again next tick
                log.exception("dispatch round failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._s.poll_seconds):  # no task per round, unlike wait_for
                    await self._wake.wait()
            self._wake.clear()

    async def _admit(self) -> None:
        free = self._s.max_concurrent - len(self._tasks) - self._reserved
        watched = self._feed.queued_watched()
        if free <= 0:
            self._more_waiting = True
            if not watched:
                return
        now, looked_at = time.time(), time.monotonic()
        claims: list[Claim] = []
        if free <= 0:
            waiting, _ = await self._runs.waiting(now)
        else:

            def choose(waiting: list[QueuedRun], running: Counter[str]) -> list[QueuedRun]:
                startable = [w for w in waiting if w.run_id not in self._tasks and not self._suspended(w.tenant_id)]
                picks = pick_runs(startable, running, per_tenant_limit=self._s.runs_per_tenant, free_slots=free)
                self._more_waiting = len(picks) < len(startable)
                return picks

            # The look and the claims of what it picks share one transaction.
            waiting, _, claims = await self._runs.admit(now, self.owner, ttl=self._s.lease_seconds, choose=choose)
        queued = {w.run_id for w in waiting}
        self._feed.prune_expected(queued, looked_at)
        if watched:
            # Streams of queued runs wait for this look instead of each reading the database on a timer:
            # a run no longer waiting and not executing here was claimed elsewhere, cancelled or ended.
            for run_id in watched:
                if run_id not in queued and run_id not in self._tasks:
                    self._feed.nudge(run_id)
        for claim in claims:
            if claim.cancel_requested:
                self._cancel.add(claim.run_id)
            self._held[claim.tenant_id] += 1
            self._tenant_of[claim.run_id] = claim.tenant_id
            self._tasks[claim.run_id] = asyncio.create_task(self._execute(claim), name=f"run-{claim.run_id}")

    async def _execute(self, claim: Claim, begun: RunRecord | None = None) -> None:
        """Execute a claimed run; begun: the run as StartRun wrote it, RUNNING already (never executed)."""
        try:
            token = self._sealer.open(claim.grant, claim.run_id)
        except Exception:  # noqa: BLE001 - a grant that does not open can never run
            log.error("run grant unreadable", extra={"tenant_id": claim.tenant_id, "run_id": claim.run_id})
            await self._runs.drop(claim.run_id)
            self._done(claim.run_id)
            return
        ctx = TenantContext(
            tenant_id=claim.tenant_id,
            principal_id=claim.principal_id,
            tier=claim.tier,
            token=token,
            run_id=claim.run_id,
            request_id=claim.run_id,
        )
        outage = False
        try:
            with tenant_scope(ctx):
                try:
                    # RUNNING now, in one transaction (StartRun wrote a run it leased as RUNNING).
                    run, fresh = (begun, True) if begun is not None else await self._runs.begin(claim.run_id)
                except NotFound:  # an entry left without its run (a crash while queueing): never runnable
                    log.warning("queued run not found", extra={"tenant_id": claim.tenant_id, "run_id": claim.run_id})
                    await self._runs.drop(claim.run_id)
                    return
                if run.status.terminal:
                    await self._runs.drop(claim.run_id)
                    return
                if fresh:  # every step of the run will pass the feed: watchers here need not read the database
                    self._feed.open(claim.run_id, claim.tenant_id)
                job = RunJob(
                    run_id=run.run_id,
                    tenant_id=claim.tenant_id,
                    team=run.team_spec,
                    entry_agent=run.entry_agent,
                    run_input=run.input,
                )
                recorder = _Recorder(self._runs, self._feed, run)
                trace_token = attach_traceparent(claim.traceparent)  # the run continues StartRun's trace
                try:
                    await self._engine.execute(
                        job,
                        self._ports_for(),
                        fresh=fresh,
                        cancelled=lambda: claim.run_id in self._cancel,
                        suspended=lambda: self._suspended(claim.tenant_id),
                        on_step=recorder.put,
                        on_load=self._syncer(claim.run_id),
                    )
                finally:
                    detach(trace_token)
                    await recorder.close()
        except StepConflict:
            log.warning("run lease lost", extra={"tenant_id": claim.tenant_id, "run_id": claim.run_id})
        except asyncio.CancelledError:
            await asyncio.shield(self._runs.release(claim.run_id, self.owner))
        except Unauthenticated as exc:
            reason, message = _REFUSED_TOKEN.get(
                exc.reason, ("UNAUTHENTICATED", f"a service refused the run's delegated token ({exc.reason})")
            )
            await self._fail(ctx, claim.run_id, reason, message)
        except Unavailable:
            delay = self._outage_delay(claim.run_id)
            log.warning(
                "run paused: a dependency is unavailable; tried again in %.0f s",
                delay,
                extra={"tenant_id": claim.tenant_id, "run_id": claim.run_id},
            )
            await self._runs.release(claim.run_id, self.owner, retry_after=delay)
            outage = True
        except Exception as exc:  # record the failure on the run rather than retry forever
            if isinstance(exc, TenantSuspended) or suspended_refusal(exc):
                # Back in the queue where it stopped; not claimed again until the tenant is resumed.
                log.info("run paused: tenant suspended", extra={"tenant_id": claim.tenant_id, "run_id": claim.run_id})
                await self._runs.release(claim.run_id, self.owner)
                return
            log.exception("run failed", extra={"tenant_id": claim.tenant_id, "run_id": claim.run_id})
            await self._fail(ctx, claim.run_id, "INTERNAL", "the run failed inside the orchestrator")
        finally:
            if not outage:  # it got past whatever was down, or ended
                self._outages.pop(claim.run_id, None)
            self._done(claim.run_id)

    def _outage_delay(self, run_id: str) -> float:
        """How long a run that met an unavailable dependency waits before its next claim."""
        failures = self._outages.pop(run_id, 0)
        self._outages[run_id] = failures + 1
        if len(self._outages) > 10_000:
            self._outages.popitem(last=False)
        first, most = self._s.outage_backoff
        return min(first * 2**failures, most)

    def _done(self, run_id: str) -> None:
        self._tasks.pop(run_id, None)
        tenant_id = self._tenant_of.pop(run_id, None)
        if tenant_id is not None:
            self._release_held(tenant_id)
        self._cancel.discard(run_id)
        self._feed.nudge(run_id)
        if self._more_waiting:  # else nothing waited at the last look, and whatever was queued since woke us
            self._wake.set()

    async def _fail(self, ctx: TenantContext, run_id: str, reason: str, message: str) -> None:
        with tenant_scope(ctx):
            try:
                await self._runs.update(run_id, status=RunStatus.FAILED, error_reason=reason, error_message=message)
            except Exception:
                log.exception("could not record run failure", extra={"run_id": run_id})
        self._feed.publish(run_id, Step(0, StepKind.RUN_FINISHED, ""), None)

    def _syncer(self, run_id: str):
        async def on_load(steps: list[Step], view: RunView) -> None:
            # Steps a dead replica appended to state but never recorded here (killed in between),
            # including, possibly, the run's end.
            run = await self._runs.record_steps(
                run_id, steps, current_agent=view.current_agent, finished=view.finished, skip_existing=True
            )
            self._feed.publish(run_id, steps[-1], run)

        return on_load

    async def _heartbeats(self) -> None:
        """Renew the leases of every run executing here, every third of the lease, in one transaction."""
        interval = self._s.lease_seconds / 3
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), interval)
                return
            run_ids = list(self._tasks)
            if not run_ids:
                continue
            try:
                outcomes = await self._runs.renew_many(run_ids, self.owner, ttl=self._s.lease_seconds, now=time.time())
            except Exception:  # noqa: BLE001 - keep trying until the leases would expire
                log.warning("lease renewal failed", extra={"runs": len(run_ids)})
                continue
            for run_id, outcome in outcomes.items():
                if outcome == "cancel":
                    self._cancel.add(run_id)
                elif outcome == "lost" and (task := self._tasks.get(run_id)) is not None:
                    log.warning("lease taken over, stopping", extra={"run_id": run_id})
                    task.cancel()


class _Recorder:
    """Copies a run's steps into the orchestrator's tables off the run's critical path.

    State already holds each step durably before the engine moves on. Watchers on this replica
    get each step from the live feed at once; the copy for GetRun, ListRuns and other replicas is
    written in order, in batches at most batch_window apart (one write per batch, so a busy replica
    writes a few times per run rather than once per step), while the next steps execute. Only the
    final step waits for its write, so a run never looks finished before its end is stored. If the
    process dies first, the next execution catches up from state (Dispatcher._syncer).
    """

    def __init__(self, runs: RunStore, feed: StepFeed, run: RunRecord, *, batch_window: float = 2.0):
        self._runs, self._feed, self._run, self._window = runs, feed, run, batch_window
        self._pending: list[tuple[Step, str]] = []
        self._last_at: float | None = None
        """When the last step recorded by this recorder was made (the next batch's first latency)."""
        self._wake = asyncio.Event()
        self._closing = False
        self._closed = asyncio.Event()
        """Set by close(): ends the batching wait at once (the run's slot waits on it)."""
        self._lock = asyncio.Lock()
        self._task = asyncio.create_task(self._loop(), name=f"record-{run.run_id}")

    async def put(self, step: Step, view: RunView) -> None:
        """Take a step just appended to state (the engine's on_step)."""
        self._pending.append((step, view.current_agent))
        self._run = dataclasses.replace(
            self._run, step_count=step.index, current_agent=view.current_agent, status=RunStatus.RUNNING
        )
        if step.kind == StepKind.RUN_FINISHED and view.finished is not None:
            run = await self._flush(view.finished)
            if run is not None:
                self._feed.publish(self._run.run_id, step, run)
                if run.status.terminal:
                    # After the watchers know: the end is stored, and an entry left by a crash here is
                    # dropped at its next claim.
                    try:
                        await self._runs.drop(self._run.run_id)
                    except Exception:
                        log.exception("leaving the queue failed", extra={"run_id": self._run.run_id})
            return
        self._feed.publish(self._run.run_id, step, self._run)
        self._wake.set()

    async def close(self) -> None:
        """Write what is pending, then stop."""
        self._closing = True
        self._closed.set()
        self._wake.set()
        await asyncio.shield(self._task)
        await self._flush(None)
        self._feed.forget(self._run.run_id)

    async def _loop(self) -> None:
        while not self._closing:
            await self._wake.wait()
            self._wake.clear()
            if not self._closing:  # gather a few steps into one transaction
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._window):
                        await self._closed.wait()
            await self._flush(None)

    async def _flush(self, finished) -> RunRecord | None:
        async with self._lock:
            batch, self._pending = self._pending, []
            if not batch and finished is None:
                return None
            try:
                run = await self._runs.record_steps(
                    self._run.run_id,
                    [b[0] for b in batch],
                    current_agent=batch[-1][1] if batch else self._run.current_agent,
                    finished=finished,
                    previous_at=self._last_at,
                    drop=False,  # put() drops the entry once the end is published
                )
                if batch:
                    self._last_at = batch[-1][0].created_at
                return run
            except Exception:
                log.exception("recording steps failed", extra={"run_id": self._run.run_id})
                return None
