"""What each RPC does, in domain terms: teams CRUD, starting, reading, watching and cancelling runs."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Protocol

from services.orchestrator.dispatcher import Dispatcher, StepFeed
from services.orchestrator.grants import GrantSealer
from services.orchestrator.runs import RunStatus
from services.orchestrator.steps import Step
from services.orchestrator.store import RunRecord, RunStore, TeamRecord, TeamStore, new_run_id
from services.orchestrator.team import TeamSpec, validate_team
from shared.errors import InvalidArgument
from shared.paging import Page
from shared.telemetry import current_traceparent
from shared.tenancy import require_tenant

MAX_INPUT_CHARS = 32_000


@dataclasses.dataclass(frozen=True)
class RunQueue:
    """Why a queued run waits: its place in its tenant's queue, and the tenant's concurrency."""

    position: int
    """Its place among the tenant's queued runs, from 1."""
    running: int
    """The tenant's runs executing now."""
    limit: int
    """The most runs the tenant may execute at once."""


RUN_SCOPES = (
    "state.threads.read",
    "state.threads.write",
    "state.context.read",
    "state.context.write",
    "inference.messages.create",
    # What the proxy and state do with the forwarded token on the run's behalf.
    "metering.usage.write",
    "metering.budget.write",
    "metering.quota.read",
    "credentials.keys.encrypt",
    "credentials.keys.decrypt",
    # Tool secrets, and the tenant's own provider key if it brought one (read by the proxy).
    "credentials.secrets.read",
)
"""Scopes of a run's delegated token: what its steps need, nothing to manage teams, keys or tenants."""

TEAM_FIELDS = ("description", "agents", "http_tools", "allowed_hosts")


class Delegator(Protocol):
    """Turns the caller's token into a narrower one for a run (identity's ExchangeToken)."""

    async def delegate(self, *, scopes: list[str], run_id: str, ttl: int) -> str:
        """The delegated token."""


class Orchestrator:
    """The service's operations; every one acts for the tenant of the current request."""

    def __init__(
        self,
        *,
        teams: TeamStore,
        runs: RunStore,
        dispatcher: Dispatcher,
        feed: StepFeed,
        delegator: Delegator,
        sealer: GrantSealer,
        delegation_ttl: int = 3600,
        watch_poll: float = 1.0,
    ):
        self._teams, self._runs, self._dispatcher, self._feed = teams, runs, dispatcher, feed
        self._delegator, self._sealer, self._ttl, self._poll = delegator, sealer, delegation_ttl, watch_poll

    # --- teams -------------------------------------------------------------------------------

    async def create_team(self, spec: TeamSpec) -> TeamRecord:
        """Validate and store a new team."""
        _check(spec)
        return await self._teams.create(spec)

    async def get_team(self, name: str) -> TeamRecord:
        """One team."""
        _require_name(name, "name")
        return await self._teams.get(name)

    async def list_teams(self, page_size: int, page_token: str) -> Page:
        """One page of teams."""
        return await self._teams.list(page_size, page_token)

    async def update_team(self, spec: TeamSpec, etag: str, mask: list[str]) -> TeamRecord:
        """Replace the masked fields of a team (all when mask is empty)."""
        _require_name(spec.name, "team.name")
        unknown = [p for p in mask if p not in TEAM_FIELDS]
        if unknown:
            raise InvalidArgument(
                "update_mask names fields that cannot be updated",
                violations={"update_mask": f"unknown or read-only: {', '.join(unknown)}"},
            )
        current = await self._teams.get(spec.name)
        if mask:
            spec = dataclasses.replace(current.spec, **{f: getattr(spec, f) for f in mask})
        _check(spec)
        return await self._teams.replace(spec, etag or "")

    async def delete_team(self, name: str) -> None:
        """Delete a team (runs keep their snapshot)."""
        _require_name(name, "name")
        await self._teams.delete(name)

    # --- runs --------------------------------------------------------------------------------

    async def start_run(self, *, team: str, entry_agent: str, run_input: str, idempotency_key: str) -> RunRecord:
        """Queue a run (or return the run this idempotency key already started)."""
        run, _ = await self.start_run_placed(
            team=team, entry_agent=entry_agent, run_input=run_input, idempotency_key=idempotency_key
        )
        return run

    async def start_run_placed(
        self, *, team: str, entry_agent: str, run_input: str, idempotency_key: str
    ) -> tuple[RunRecord, RunQueue | None]:
        """start_run(), with where the run waits when it is queued (as queue_of() says)."""
        v: dict[str, str] = {}
        if not team:
            v["team"] = "required"
        if not run_input.strip():
            v["input"] = "required"
        elif len(run_input) > MAX_INPUT_CHARS:
            v["input"] = f"at most {MAX_INPUT_CHARS} characters"
        if len(idempotency_key) > 128:
            v["idempotency_key"] = "at most 128 characters"
        if v:
            raise InvalidArgument("invalid run request", violations=v)
        ctx = require_tenant()
        run_id = new_run_id()
        # Without an idempotency key the delegation (a round trip to identity) overlaps reading the
        # team; it is dropped if the team or its entry agent turns out not to exist. With one, a
        # retry must find its run before anything is delegated.
        delegation = None if idempotency_key else asyncio.ensure_future(self._delegate(run_id))
        try:
            spec = (await self._teams.get(team)).spec
            entry = entry_agent or spec.agents[0].name
            if spec.agent(entry) is None:
                raise InvalidArgument(
                    f"team {team!r} has no agent {entry!r}",
                    reason="UNKNOWN_AGENT",
                    violations={"entry_agent": "not an agent of this team"},
                )
        except BaseException:
            if delegation is not None:
                delegation.cancel()
                await asyncio.gather(delegation, return_exceptions=True)
            raise
        if delegation is None:
            existing = await self._runs.by_idempotency_key(idempotency_key)
            if existing is not None:
                return existing, await self.queue_of(existing)
            delegation = asyncio.ensure_future(self._delegate(run_id))
        token = await delegation
        # A free slot here: the run starts at once when fair admission allows (no trip through the queue).
        lease = self._dispatcher.lease_for_new_run(ctx.tenant_id)
        claim = place = None
        try:
            run, created, claim, place = await self._runs.start(
                team=spec,
                entry_agent=entry,
                run_input=run_input,
                idempotency_key=idempotency_key,
                tenant_id=ctx.tenant_id,
                principal_id=ctx.principal_id,
                tier=ctx.tier,
                grant=self._sealer.seal(token, run_id),
                run_id=run_id,
                traceparent=current_traceparent(),
                lease=lease,
                known_new=bool(idempotency_key),
            )
        finally:
            if lease is not None and claim is None:
                self._dispatcher.unreserve(ctx.tenant_id)
        if claim is not None:
            await self._dispatcher.adopt(claim, run)
        else:
            if created and run.status == RunStatus.QUEUED:
                # Fresh and queued: until it leaves the queue, its streams here know it has no steps.
                self._feed.expect(run_id, ctx.tenant_id)
            self._dispatcher.wake()
        if place is not None and run.status == RunStatus.QUEUED:
            return run, RunQueue(place.position, place.running, self._dispatcher.runs_per_tenant)
        return run, await self.queue_of(run)

    async def _delegate(self, run_id: str) -> str:
        return await self._delegator.delegate(scopes=list(RUN_SCOPES), run_id=run_id, ttl=self._ttl)

    async def get_run(self, run_id: str) -> RunRecord:
        """One run."""
        _require_name(run_id, "run_id")
        return await self._runs.get(run_id)

    async def queue_of(self, run: RunRecord) -> RunQueue | None:
        """Where the caller's run waits, when it is queued (the caller's tenant's entries only)."""
        if run.status != RunStatus.QUEUED:
            return None
        place = await self._runs.place(run.run_id, require_tenant().tenant_id, time.time())
        if place is None:  # claimed a moment ago
            return None
        return RunQueue(place.position, place.running, self._dispatcher.runs_per_tenant)

    async def list_runs(self, *, page_size: int, page_token: str, status: RunStatus | None, team: str) -> Page:
        """One page of runs."""
        return await self._runs.list(page_size=page_size, page_token=page_token, status=status, team=team)

    async def cancel_run(self, run_id: str) -> RunRecord:
        """Cancel a run; a running one stops before its next step."""
        _require_name(run_id, "run_id")
        run = await self._runs.cancel(run_id)
        self._dispatcher.cancel_local(run_id)
        self._feed.nudge(run_id)  # its streams here read the run again (a queued run ends at once)
        return run

    async def watch(self, run_id: str, after_step: int) -> AsyncIterator[tuple[Step, RunRecord]]:
        """Every step after after_step as it is recorded, with the run as of then; ends with the run."""
        _require_name(run_id, "run_id")
        if after_step < 0:
            raise InvalidArgument("after_step must not be negative", violations={"after_step": "must be >= 0"})
        quiet = self._poll
        with self._feed.subscribe(run_id) as live:
            # A fresh run of the caller's tenant executing here: every step of it is in the feed (those made
            # already were queued on subscribing), so the database has nothing to add yet.
            tenant_id = require_tenant().tenant_id
            from_feed = after_step == 0 and self._feed.complete(run_id, tenant_id)
            if not from_feed and after_step == 0 and self._dispatcher.watches_queue:
                # A fresh run of the caller's tenant that a StartRun here queued and that has not left the queue
                # since: nothing to read yet; the dispatcher's look nudges this stream when it leaves the queue
                # other than by starting here (where its steps come in the feed).
                from_feed = live.queued = self._feed.expected(run_id, tenant_id)
            while True:
                if not from_feed:
                    # Catch up from the database (steps recorded by any replica), with the run as of the
                    # last of them (complete once the run is finished: RunStore.snapshot); NotFound for
                    # another tenant's run, before anything is streamed.
                    run, steps = await self._runs.snapshot(run_id, after_step)
                    for step in steps:
                        yield step, run
                        after_step = step.index
                    if run.status.terminal:
                        return
                    # A queued run's stream waits for the dispatcher's look at the queue (WatchQueue.queued).
                    live.queued = run.status == RunStatus.QUEUED and self._dispatcher.watches_queue
                from_feed = False
                # ... then follow this replica's live feed, back to the database on a gap, when the
                # execution here stops, or on a quiet spell. A run executing here has every step in the
                # feed, so its quiet spells are long; so has a queued one: it either starts here (its
                # steps come in the feed) or the dispatcher's next look at the queue nudges this stream.
                # One executing on another replica is read again at the poll interval, backing off to 4x
                # while nothing changes.
                while True:
                    if live.queued and not self._dispatcher.executing(run_id):
                        wait = self._poll * 60  # nudged when it leaves the queue (a timer only as a backstop)
                    else:
                        wait = self._poll * 10 if self._dispatcher.executing(run_id) else quiet
                    try:
                        if live.empty():
                            # asyncio.timeout, not wait_for: no task per step, one wake-up when the step comes.
                            async with asyncio.timeout(wait):
                                step, live_run = await live.get()
                        else:
                            step, live_run = live.get_nowait()
                    except TimeoutError:
                        quiet = min(quiet * 2, self._poll * 4)
                        break
                    quiet = self._poll
                    if step is None or live_run is None or step.index > after_step + 1:
                        break
                    if step.index <= after_step:
                        continue
                    yield step, live_run
                    after_step = step.index
                    if live_run.status.terminal and step.index >= live_run.step_count:
                        return


def _check(spec: TeamSpec) -> None:
    violations = validate_team(spec)
    if violations:
        raise InvalidArgument("invalid team definition", reason="INVALID_TEAM", violations=violations)


def _require_name(value: str, field: str) -> None:
    if not value:
        raise InvalidArgument(f"{field} is required", violations={field: "required"})
    if len(value) > 128:
        raise InvalidArgument(f"{field} is too long", violations={field: "at most 128 characters"})
