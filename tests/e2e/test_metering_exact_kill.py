"""issue 19: kill -9 of a proxy replica mid-burst (2 replicas of everything, real Postgres): afterwards
the ledger holds exactly what the fake upstream billed, attempt by attempt, and never more than the budget
was spent.

An attempt's bill and its ledger event are matched by the opaque id the proxy sends upstream
(x-bulkhead-attempt, a keyed hash of tenant and event id) and recorded in the fake's journal. The fake
bills a reply before it sends it, so an attempt whose reply was lost with the killed replica is billed
as a provider would bill it; the ledger holds it either exactly (its usage reached the journal or the
outbox first) or at its reservation (settled by the restarted replica, never below the bill).
A third of the workers stream: a stream the kill cuts is settled the same way.

The killed proxy's budget leases stop being renewed (6 s leases, a 2 s heartbeat), so they come back
within seconds instead of looking spent for a minute: no call or run is refused for budget the dead
holder's leases held (its refusal figures show the call would have fit without them), calls after
the kill are served, and those leases (found by the pid in their holder name) are gone from metering
within 10 s. The budget is tight on purpose: refusals when it is really spent are allowed.
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
import signal
import time
import uuid

import asyncpg
import grpc
import pytest

from bulkhead.client import Client
from bulkhead.identity.v1 import identity_pb2 as idp
from bulkhead.inference.v1 import inference_pb2 as inf
from bulkhead.metering.v1 import metering_pb2 as mtr
from bulkhead.orchestrator.v1 import orchestrator_pb2 as orc
from services.inference.attempts import event_id
from services.inference.proxy import attempt_ref
from testkit.fake_anthropic import FakeAnthropic
from tests.e2e.test_replicas import replica_pids, start_replicated, wait_for_line

MODEL = "claude-sonnet-4-5"
BUDGET = 3000
WORKERS = 12
STREAMERS = 4
"""Of the workers, how many stream their calls (StreamMessage read to the end)."""
CALL_TIMEOUT = 20.0
ATTEMPT_SALT = "bulkhead"
"""The inference salt the exact-ledger tests give the mesh, so `reconcile` can compute attempt ids itself."""


def mesh_env(fake: FakeAnthropic) -> dict[str, str]:
    """The mesh environment every exact-ledger test starts with: the fake upstream, the known attempt salt
    (the salt no longer defaults to a public value) and slices/leases that make a kill or crash bite."""
    return {
        "ANTHROPIC_API_KEY": "sk-ant-fake",
        "ANTHROPIC_BASE_URL": fake.base_url,
        "BULKHEAD_MODEL_PROVIDER": "anthropic",
        "BULKHEAD_INFERENCE_USER_ID_SALT": ATTEMPT_SALT,  # reconcile computes attempt ids (attempt_ref) with it
        "BULKHEAD_ORCHESTRATOR_LEASE_SECONDS": "5",  # a killed holder's runs move on after 5 s, not 15
        # Slices well under the budget, so both replicas hold leases and serve (the default 20,000
        # would put the whole budget on one replica until it idles).
        "BULKHEAD_INFERENCE_LEASE_TOKENS": "500",
    }


class Burst:
    """Workers sending model calls, each resent with its request id after UNAVAILABLE (a retried step)."""

    def __init__(self, bh: Client):
        self.bh = bh
        self.stop = asyncio.Event()
        self.served = self.refused = self.resent = self.streamed = 0
        self.unexpected: list[str] = []
        self.runs: list[str] = []
        self.refusals: list[tuple[float, str]] = []
        """(wall time, metering's figures) of each RESOURCE_EXHAUSTED."""
        self.served_at: list[float] = []

    async def runs_worker(self) -> None:
        """Runs of a one-agent team: each step's model call goes through the proxies too."""
        while not self.stop.is_set():
            key = uuid.uuid4().hex  # the same key on every resend: one run
            for _ in range(40):
                try:
                    started = await self.bh.orchestrator.StartRun(
                        orc.StartRunRequest(team="exact", entry_agent="solo", input=f"ping {key}", idempotency_key=key),
                        timeout=CALL_TIMEOUT,
                    )
                    self.runs.append(started.run.run_id)
                    break
                except grpc.aio.AioRpcError as err:
                    if err.code() != grpc.StatusCode.UNAVAILABLE:
                        self.unexpected.append(f"StartRun {err.code().name}: {err.details()}")
                        break
                    await asyncio.sleep(0.3)
            await asyncio.sleep(0.5)

    async def finished_runs(self, timeout: float) -> dict[str, int]:
        """Wait until every run started is terminal; their count by status (failures: (wall time, message)
        in self.failed)."""
        deadline, done = time.monotonic() + timeout, {}
        self.failed: list[tuple[float, str]] = []
        while len(done) < len(self.runs) and time.monotonic() < deadline:
            for run_id in [r for r in self.runs if r not in done]:
                try:
                    got = await self.bh.orchestrator.GetRun(orc.GetRunRequest(run_id=run_id), timeout=CALL_TIMEOUT)
                except grpc.aio.AioRpcError:
                    continue
                name = orc.RunStatus.Name(got.run.status)
                if name == "RUN_STATUS_FAILED":
                    self.failed.append((got.run.update_time.ToNanoseconds() / 1e9, got.run.error_message))
                    name += f" {got.run.error_reason}"
                if name.startswith(("RUN_STATUS_SUCCEEDED", "RUN_STATUS_FAILED", "RUN_STATUS_CANCELLED")):
                    done[run_id] = name
            await asyncio.sleep(0.5)
        return dict(collections.Counter(done.get(r, "not finished") for r in self.runs))

    async def under_way(self, fake: FakeAnthropic) -> int:
        """Wait at least 3 s, and until the burst is really under way (a proxy's first call loads the SDK,
        which takes seconds on a loaded machine); the upstream calls in flight then."""
        under_way_by = time.monotonic() + 30
        await asyncio.sleep(3)
        while self.served < 10 or len(fake.calls) == len(fake.usage_log):
            if time.monotonic() > under_way_by:
                break
            await asyncio.sleep(0.2)
        return len(fake.calls) - len(fake.usage_log)

    async def worker(self, *, stream: bool = False) -> None:
        """Unary calls, or streams read to their end: a stream the kill cuts is an attempt like any other."""
        while not self.stop.is_set():
            rid = uuid.uuid4().hex
            for _ in range(40):
                params = inf.MessageParams(
                    model=MODEL,
                    max_tokens=20,
                    messages=[
                        inf.Message(
                            role=inf.ROLE_USER,
                            content=[inf.ContentBlock(text=inf.TextBlock(text="hello exact ledger"))],
                        )
                    ],
                )
                md = (("x-request-id", rid),)
                try:
                    if stream:
                        events = self.bh.inference.StreamMessage(
                            inf.StreamMessageRequest(params=params), metadata=md, timeout=CALL_TIMEOUT
                        )
                        async for _ in events:
                            pass
                        self.streamed += 1
                    else:
                        await self.bh.inference.CreateMessage(
                            inf.CreateMessageRequest(params=params), metadata=md, timeout=CALL_TIMEOUT
                        )
                    self.served += 1
                    self.served_at.append(time.time())
                    break
                except grpc.aio.AioRpcError as err:
                    if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        self.refused += 1
                        self.refusals.append((time.time(), err.details() or ""))
                        await asyncio.sleep(0.2)
                        break
                    if err.code() != grpc.StatusCode.UNAVAILABLE:
                        self.unexpected.append(f"{err.code().name}: {err.details()}")
                        break
                    self.resent += 1
                    await asyncio.sleep(0.2)


async def _tenant(data_dir, addresses) -> tuple[str, str]:
    """A new tenant with a hard token budget; (tenant id, its admin API key)."""
    operator_key = (data_dir / "operator.key").read_text().strip()
    async with await Client.connect(api_key=operator_key, addresses=addresses) as operator:
        created = await operator.identity.CreateTenant(idp.CreateTenantRequest(name=f"exact-{uuid.uuid4().hex[:6]}"))
        await operator.metering.SetQuota(
            mtr.SetQuotaRequest(
                quota=mtr.Quota(
                    tenant_id=created.tenant.id,
                    requests_per_minute=100_000,
                    tokens_per_minute=10_000_000,
                    budgets=[
                        mtr.Budget(
                            unit=mtr.BUDGET_UNIT_TOKENS,
                            limit=BUDGET,
                            period=mtr.BUDGET_PERIOD_MONTH,
                            mode=mtr.BUDGET_MODE_HARD,
                        )
                    ],
                )
            )
        )
    async with await Client.connect(api_key=created.admin_api_key, addresses=addresses) as bh:
        await bh.orchestrator.CreateTeam(
            orc.CreateTeamRequest(
                team=orc.Team(
                    name="exact",
                    description="one agent, one model call per run",
                    agents=[
                        orc.Agent(name="solo", system_prompt="Answer briefly.", model=MODEL, max_steps=2, max_tokens=20)
                    ],
                )
            )
        )
    return created.tenant.id, created.admin_api_key


async def _books(owner_url: str, tenant_id: str) -> tuple[dict[str, int], list[tuple]]:
    """The tenant's ledger (event key -> tokens) and the proxies' attempt journal rows."""
    conn = await asyncpg.connect(owner_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await conn.execute("SELECT set_config('app.tenant_id', $1, false)", tenant_id)
        ledger = {
            r[0]: int(r[1])
            for r in await conn.fetch(
                "SELECT idempotency_key, input_tokens + output_tokens + cache_write_tokens + cache_read_tokens "
                "FROM metering_usage_events WHERE tenant_id = $1",
                tenant_id,
            )
        }
        attempts = [
            tuple(r)
            for r in await conn.fetch(
                "SELECT request_id, attempt, reserve_input + reserve_output, state, outcome, at_reservation "
                "FROM inference_attempts WHERE tenant_id = $1",
                tenant_id,
            )
        ]
    finally:
        await conn.close()
    return ledger, attempts


async def _held_over_time(
    bh: Client,
    owner_url: str,
    tenant_id: str,
    dead_pid: int,
    stop: asyncio.Event,
    samples: list[tuple[float, int, int, int]],
) -> None:
    """Every 0.5 s: (wall time, used, held, held by the dead process's leases) of the tenant's token budget.
    GetQuotaStatus sweeps expired holds first; the dead holder's share is read by its holder name."""
    conn = await asyncpg.connect(owner_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await conn.execute("SELECT set_config('app.tenant_id', $1, false)", tenant_id)
        while not stop.is_set():
            try:
                status = (await bh.metering.GetQuotaStatus(mtr.GetQuotaStatusRequest(), timeout=5)).budgets[0]
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.5)
                continue
            dead = await conn.fetchval(
                "SELECT COALESCE(sum(tokens_held), 0) FROM metering_holds WHERE tenant_id = $1 AND kind = 'lease' "
                "AND state = 'open' AND split_part(holder, ':', 2) = $2",
                tenant_id,
                str(dead_pid),
            )
            samples.append((time.time(), status.used, status.held, int(dead)))
            await asyncio.sleep(0.5)
    finally:
        await conn.close()


_REMAIN = re.compile(r"needs (\d+), (\d+) of \d+ remain")


def stranded(refusal: str, at: float, samples: list[tuple[float, int, int, int]]) -> bool:
    """Whether a refusal at wall time `at` was for budget the dead holder's leases held: the call would
    have fit had they come back (its `needs`, at most what remained plus their share around then)."""
    found = _REMAIN.search(refusal)
    if found is None:
        return True  # not metering's figures: not explained by a spent budget
    needs, remaining = int(found.group(1)), int(found.group(2))
    dead = max((d for t, _, _, d in samples if abs(t - at) <= 1.0), default=0)
    return dead > 0 and needs <= remaining + dead


def reconcile(tenant_id: str, ledger: dict[str, int], attempts: list[tuple], billed: dict[str, int]) -> dict:
    """Match every attempt's ledger event with its bill; what does not match is listed under `problems`."""
    problems: list[str] = []
    by_ref = {}
    for request_id, number, reserve, state, outcome, at_reservation in attempts:
        key = event_id(request_id, number)
        by_ref[attempt_ref(ATTEMPT_SALT.encode(), tenant_id, key)] = (key, reserve, state, outcome, at_reservation)
    expected = at_reservation_count = 0
    for ref, (key, reserve, state, outcome, flagged) in by_ref.items():
        got, bill = ledger.get(key), billed.get(ref)
        if bill is not None and got == bill:
            expected += bill  # metered exactly as billed
        elif got == reserve and (flagged or not outcome) and (bill is None or bill <= reserve):
            expected += reserve  # settled at its reservation: counted as billed at it
            at_reservation_count += 1
        elif bill is None and got is None and outcome:
            pass  # answered without usage (an error before any work): nothing to bill
        else:
            problems.append(f"{key}: ledger {got}, billed {bill}, reserved {reserve}, state {state} {outcome!r}")
    problems += [f"billed attempt {ref} never journalled" for ref in billed if ref not in by_ref]
    journalled = {key for key, *_ in by_ref.values()}
    problems += [f"ledger event {key} has no attempt" for key in ledger if key not in journalled]
    return {
        "ledger": sum(ledger.values()),
        "billed": sum(billed.values()),
        "expected": expected,
        "at_reservation": at_reservation_count,
        "attempts": len(by_ref),
        "problems": problems,
    }


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.parametrize("victim", ["inference#1", "metering#1", "orchestrator#1"])
async def test_kill_9_mid_burst_leaves_the_ledger_equal_to_the_bill(postgres, tmp_path, victim):
    """kill -9 of a proxy replica (calls in flight), a metering replica (usage and leases in flight) or an
    orchestrator replica (run steps in flight) mid-burst; once restarts and outboxes have settled, every
    billed attempt is in the ledger exactly once
    (exactly as billed, or at its reservation), nothing unbilled is metered except at its reservation,
    and used + held never passed the budget."""
    started = time.monotonic()
    urls = await postgres.create_database(f"exact_{uuid.uuid4().hex[:8]}")
    async with FakeAnthropic(delay=1.0) as fake:  # ~6 calls upstream per replica at any time
        mesh, addresses = await asyncio.to_thread(
            start_replicated,
            tmp_path / "mesh",
            mesh_env(fake),
            ("--postgres", urls.app_url, "--postgres-owner", urls.owner_url),
        )
        try:
            tenant_id, api_key = await _tenant(mesh.data_dir, addresses)
            async with await Client.connect(api_key=api_key, addresses=addresses) as bh:
                burst = Burst(bh)
                workers = [asyncio.create_task(burst.worker()) for _ in range(WORKERS - STREAMERS)]
                workers += [asyncio.create_task(burst.worker(stream=True)) for _ in range(STREAMERS)]
                workers += [asyncio.create_task(burst.runs_worker()) for _ in range(2)]
                in_flight = await burst.under_way(fake)
                pid = replica_pids(mesh)[victim]
                watching, samples = asyncio.Event(), []
                monitor = asyncio.create_task(_held_over_time(bh, urls.owner_url, tenant_id, pid, watching, samples))
                await asyncio.sleep(0.6)  # one sample before the kill
                os.kill(pid, signal.SIGKILL)
                killed_at = time.time()
                await wait_for_line(mesh, rf"!! {re.escape(victim)} is healthy again", 90)
                # After a proxy kill, calls go on for 10 s: past the killed proxy's leases' TTL.
                await asyncio.sleep(max(2.0, killed_at + 10 - time.time()) if victim.startswith("inference") else 2.0)
                burst.stop.set()
                await asyncio.gather(*workers)
                watching.set()
                await monitor
                runs = await burst.finished_runs(90)  # every step's model call made before reconciling
                status = (await bh.metering.GetQuotaStatus(mtr.GetQuotaStatusRequest())).budgets[0]
            # The restarted replica settles its predecessor's rows at once; outboxes deliver within seconds.
            deadline = time.monotonic() + 60
            while True:
                billed = {r.attempt_ref: sum(r.usage.values()) for r in fake.usage_log}
                report = reconcile(tenant_id, *await _books(urls.owner_url, tenant_id), billed)
                if not report["problems"] or time.monotonic() > deadline:
                    break
                await asyncio.sleep(1)
        finally:
            await asyncio.to_thread(mesh.stop)
    print(
        f"\n[exact] kill -9 {victim}: {burst.served} served ({burst.streamed} streamed), {burst.refused} refused, "
        f"{burst.resent} resent after UNAVAILABLE; "
        f"{in_flight} upstream calls in flight at the kill; whole test {time.monotonic() - started:.0f}s"
    )
    print(f"[exact] runs: {runs}")
    print(
        "[exact] token budget after the kill (s: used / held, of which the killed process's leases): "
        + ", ".join(f"{t - killed_at:+.1f}s: {used}/{held} ({dead})" for t, used, held, dead in samples)
    )
    after = [(t, text) for t, text in burst.refusals if t >= killed_at]
    served_after = sum(1 for t in burst.served_at if t >= killed_at)
    failed_after = [(t, text) for t, text in burst.failed if t >= killed_at]
    wrongly = [(round(t - killed_at, 1), text[:200]) for t, text in after + failed_after if stranded(text, t, samples)]
    print(
        f"[exact] after the kill: {served_after} calls served, {len(after)} refused "
        f"(first at {min((round(t - killed_at, 1) for t, _ in after), default=None)} s); "
        f"{len(failed_after)} runs failed; refused for the dead holder's leases: {len(wrongly)}; first refusal: "
        f"{min(after + failed_after, default=(0, ''))[1][-160:]!r}"
    )
    print(f"[exact] fake: {len(fake.calls)} requests received, {len(fake.usage_log)} billed")
    print(
        f"[exact] billed {report['billed']} tokens over {len(billed)} attempts; ledger {report['ledger']} "
        f"= billed with {report['at_reservation']} attempt(s) counted at their reservation: {report['expected']}; "
        f"budget {BUDGET}: used {status.used}, held {status.held}"
    )
    assert re.findall(r"!! (\w+#\d) exited with code -9", "".join(mesh.lines)) == [victim]
    assert not burst.unexpected, burst.unexpected
    # Calls go on after the kill; a refusal or a failed run only when the budget is really spent, never
    # for budget the killed proxy's leases held.
    assert served_after >= 10 and wrongly == [], (served_after, wrongly)
    spent = ("RUN_STATUS_FAILED BUDGET_EXHAUSTED",) if victim.startswith("inference") else ()
    assert runs and all(r == "RUN_STATUS_SUCCEEDED" or r in spent for r in runs), runs
    if victim.startswith("inference"):
        dead_at_kill = max(dead for t, _, _, dead in samples if t < killed_at + 0.5)
        assert dead_at_kill > 0, "the killed proxy held leases"
        back = next((t - killed_at for t, _, _, dead in samples if t > killed_at and dead == 0), None)
        print(
            f"[exact] the killed proxy held {dead_at_kill} tokens in leases; back at metering after "
            f"{back if back is None else round(back, 1)} s"
        )
        assert back is not None and back < 10, "a dead holder's leases come back within seconds (6 s TTL + sweep)"
    assert in_flight > 0 and burst.served >= 10, "the kill must land mid-burst"
    assert burst.streamed >= 1, "streams were metered too"
    assert report["problems"] == []
    if victim.startswith("inference"):
        assert burst.resent >= 1, "calls on the killed proxy fail UNAVAILABLE and are resent"
        assert report["at_reservation"] >= 1, "the killed replica's calls in flight are settled at their reservation"
    assert report["ledger"] == report["expected"]
    assert report["billed"] <= BUDGET and status.used + status.held <= BUDGET
