"""issue 19: the database stopped the way a crash stops it (`pg_ctl stop -m immediate`) mid-burst and
started again, under 2 replicas of everything: afterwards the ledger holds exactly what the fake upstream
billed, attempt by attempt (see test_metering_exact_kill for how they are matched).

The cluster is this test's own (stopping the session's server would disturb other tests), with
synchronous commits: an acknowledged commit must survive the crash, as on a production server.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
import signal
import time
import uuid

import pytest

from bulkhead.client import Client
from bulkhead.metering.v1 import metering_pb2 as mtr
from testkit.fake_anthropic import FakeAnthropic
from testkit.postgres import ADMIN_ROLE, PostgresServer, _initdb, _launch, find_bindir
from testkit.procs import ServerStartError, free_port, make_workdir, stop_process, unprivileged_account
from tests.e2e.test_metering_exact_kill import BUDGET, WORKERS, Burst, _books, _tenant, mesh_env, reconcile
from tests.e2e.test_replicas import start_replicated


class CrashablePostgres:
    """A local cluster of its own that can be stopped immediately and started again on the same port."""

    def __init__(self):
        self.bindir = find_bindir()
        if self.bindir is None:
            pytest.skip("no local PostgreSQL binaries")
        self.account = unprivileged_account()
        self.root = make_workdir("bulkhead-pgexact-")
        os.chmod(self.root, 0o700)
        self.account.chown(self.root)
        password = secrets.token_urlsafe(18)
        _initdb(self.bindir, self.root, password, self.account)
        with open(os.path.join(self.root, "data", "postgresql.conf"), "a") as conf:
            conf.write("\nsynchronous_commit = on\n")  # later lines win over the test cluster's `off`
        self.port = free_port()
        self.proc = _launch(self.bindir, self.root, self.port, self.account)
        self.server = PostgresServer(
            host="127.0.0.1",
            port=self.port,
            admin_user=ADMIN_ROLE,
            admin_password=password,
            backend="local",
            socket_dir=self.root,
        )

    def crash(self) -> None:
        """SIGQUIT to the postmaster: what `pg_ctl stop -m immediate` sends (no shutdown checkpoint)."""
        self.proc.send_signal(signal.SIGQUIT)
        self.proc.wait(timeout=30)

    def start(self) -> None:
        """Start again on the same data and port (crash recovery replays the WAL)."""
        for attempt in range(5):
            try:
                self.proc = _launch(self.bindir, self.root, self.port, self.account)
                return
            except ServerStartError:  # the crashed server's backends may still hold its shared memory
                if attempt == 4:
                    raise
                time.sleep(1)

    def close(self) -> None:
        stop_process(self.proc, signal.SIGQUIT)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.postgres
async def test_database_crash_and_restart_mid_burst_leaves_the_ledger_equal_to_the_bill(tmp_path):
    """Postgres stopped immediately for 3 s mid-burst, then started: calls fail only UNAVAILABLE meanwhile
    (and are resent), and every billed attempt ends in the ledger exactly once, exactly as billed or at
    its reservation; used + held within the budget."""
    started = time.monotonic()
    pg = CrashablePostgres()
    try:
        urls = await pg.server.create_database(f"exactdb_{uuid.uuid4().hex[:8]}")
        async with FakeAnthropic(delay=1.0) as fake:
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
                    workers = [asyncio.create_task(burst.worker()) for _ in range(WORKERS)]
                    workers += [asyncio.create_task(burst.runs_worker()) for _ in range(2)]
                    in_flight = await burst.under_way(fake)
                    pg.crash()
                    await asyncio.sleep(3)
                    pg.start()
                    await asyncio.sleep(8)
                    burst.stop.set()
                    await asyncio.gather(*workers)
                    runs = await burst.finished_runs(90)
                    status = (await bh.metering.GetQuotaStatus(mtr.GetQuotaStatusRequest())).budgets[0]
                deadline = time.monotonic() + 60
                while True:
                    billed = {r.attempt_ref: sum(r.usage.values()) for r in fake.usage_log}
                    report = reconcile(tenant_id, *await _books(urls.owner_url, tenant_id), billed)
                    if not report["problems"] or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(1)
            finally:
                await asyncio.to_thread(mesh.stop)
    finally:
        pg.close()
    print(
        f"\n[exact-db] {burst.served} served, {burst.refused} refused, {burst.resent} resent after UNAVAILABLE; "
        f"{in_flight} upstream calls in flight at the crash; whole test {time.monotonic() - started:.0f}s"
    )
    print(f"[exact-db] runs: {runs}")
    print(
        f"[exact-db] billed {report['billed']} tokens over {len(billed)} attempts; ledger {report['ledger']} "
        f"= billed with {report['at_reservation']} attempt(s) counted at their reservation: {report['expected']}; "
        f"budget {BUDGET}: used {status.used}, held {status.held}"
    )
    assert not re.findall(r"exited with code", "".join(mesh.lines)), "no service may die with its database"
    assert not burst.unexpected, burst.unexpected
    assert in_flight > 0 and burst.resent >= 1, "the crash must land mid-burst"
    assert report["problems"] == []
    assert report["ledger"] == report["expected"]
    assert report["billed"] <= BUDGET and status.used + status.held <= BUDGET
    # The budget is tight on purpose: a run may fail BUDGET_EXHAUSTED when it runs out, never otherwise.
    assert runs and all(
        r == "RUN_STATUS_SUCCEEDED" or r.startswith("RUN_STATUS_FAILED BUDGET_EXHAUSTED") for r in runs
    ), runs
