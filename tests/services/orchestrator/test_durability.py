"""kill -9 of the orchestrator process mid-run: the restarted process finishes the run without
repeating a completed model or tool call, and metering counts every model call once."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from bulkhead.credentials.v1 import credentials_pb2, credentials_pb2_grpc
from bulkhead.metering.v1 import metering_pb2, metering_pb2_grpc
from bulkhead.orchestrator.v1 import orchestrator_pb2 as pb
from bulkhead.orchestrator.v1 import orchestrator_pb2_grpc
from testkit.fake_anthropic import FakeAnthropic, Fault, Reply
from testkit.procs import free_port

from .fakes import ToolServer
from .mesh import TIERS, running_mesh, team_pb

ROOT = Path(__file__).resolve().parents[3]
SECRET = "durable-key-Zx81Qp"


def spawn(env: dict[str, str], log: Path) -> subprocess.Popen:
    """python -m services.orchestrator, as a real separate process."""
    return subprocess.Popen(
        [sys.executable, "-m", "services.orchestrator"],
        cwd=ROOT,
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


async def until(check, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = await check()
            if result:
                return result
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached in time")


@pytest.mark.slow
@pytest.mark.parametrize("tier", list(TIERS))
async def test_kill9_mid_run_then_restart_completes_without_repeats(tier, tmp_path):
    """A run of each tier survives kill -9; completed steps are not redone; usage is counted once per call."""
    async with asyncio.timeout(60):
        await _scenario(tmp_path, tier)


async def _scenario(tmp_path: Path, tier: str) -> None:
    tools = ToolServer(body='{"invoice": "INV-9", "status": "overdue"}')
    async with (
        FakeAnthropic() as upstream,
        running_mesh(tmp_path, upstream_url=upstream.base_url, start_orchestrator=False) as mesh,
    ):
        port = free_port()
        env = {
            **os.environ,
            **mesh.env,
            "BULKHEAD_ORCHESTRATOR_ADDR": f"127.0.0.1:{port}",
            "BULKHEAD_ORCHESTRATOR_DATA_DIR": str(tmp_path / "orch"),
            "BULKHEAD_DATA_DIR": str(tmp_path / "orch"),
            "BULKHEAD_ORCHESTRATOR_LEASE_SECONDS": "1.5",
            "BULKHEAD_ORCHESTRATOR_CANARY_KEY": "cd" * 32,
            "BULKHEAD_LOG_LEVEL": "INFO",
            "PYTHONPATH": str(ROOT),
            # Its own data dir, but the platform key identity wrote for the mesh's orchestrator: without
            # it the process never hears identity's revocation feed and refuses every tenant (fail closed).
            "BULKHEAD_ORCHESTRATOR_SERVICE_KEY_FILE": str(mesh.identity.service_key_file("orchestrator")),
        }
        log = tmp_path / "orchestrator.log"
        proc = spawn(env, log)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        try:
            a = await mesh.tenant(tier)
            creds = credentials_pb2_grpc.CredentialsServiceStub(grpc.aio.insecure_channel(mesh.addr("credentials")))
            await creds.PutSecret(
                credentials_pb2.PutSecretRequest(name="billing_api_key", value=SECRET.encode()), metadata=a.metadata
            )
            await until(lambda: stub.ListTeams(pb.ListTeamsRequest(), metadata=a.metadata, timeout=1))
            await stub.CreateTeam(
                pb.CreateTeamRequest(team=team_pb(tool_host=tools.host, model="claude-sonnet-4-5")), metadata=a.metadata
            )
            # The third model call is slow enough for the kill to land while it is in flight.
            upstream.script(
                Reply.tool_use("handoff", {"agent": "billing", "note": "INV-9"}),
                Reply.tool_use("lookup_invoice", {"invoice": "INV-9"}, tool_id="toolu_9"),
                Reply.text("INV-9 is overdue."),
                Reply.text("INV-9 is overdue."),
            )
            upstream.fail_next(Fault.slow(0), Fault.slow(0), Fault.slow(4))
            run = (
                await stub.StartRun(pb.StartRunRequest(team="support", input="What about INV-9?"), metadata=a.metadata)
            ).run
            seen: list[int] = []

            async def watch_until_kill() -> None:
                async for msg in stub.WatchRun(pb.WatchRunRequest(run_id=run.run_id), metadata=a.metadata):
                    seen.append(msg.step.index)

            watcher = asyncio.create_task(watch_until_kill())
            await until(lambda: asyncio.sleep(0, upstream.request_count >= 3 and len(seen) >= 5))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            with pytest.raises(grpc.aio.AioRpcError):
                await watcher
            assert seen == [1, 2, 3, 4, 5] and len(tools.requests) == 1

            proc = spawn(env, log)
            resumed = await until(lambda: _watch_rest(stub, run.run_id, seen[-1], a.metadata), timeout=30)
            final = resumed[-1].run
            assert [m.step.index for m in resumed] == [6, 7]  # the stream picks up after what was seen
            assert final.status == pb.RUN_STATUS_SUCCEEDED and final.output == "INV-9 is overdue."

            # Completed steps were not redone: one tool request, and each completed model call's
            # request reached the upstream exactly once. The call in flight at the kill is retried
            # with the same request id; the proxy may answer it from its own record (3 calls) or
            # send it again (4, the last two identical).
            bodies = [json.dumps(c.body, sort_keys=True) for c in upstream.calls]
            assert len(tools.requests) == 1
            assert bodies.count(bodies[0]) == 1 and bodies.count(bodies[1]) == 1
            assert len(bodies) == 3 or (len(bodies) == 4 and bodies[2] == bodies[3])

            metering = metering_pb2_grpc.MeteringServiceStub(grpc.aio.insecure_channel(mesh.addr("metering")))
            window = metering_pb2.UsageFilter()
            window.start_time.FromSeconds(int(time.time()) - 3600)
            window.end_time.FromSeconds(int(time.time()) + 3600)

            async def counted() -> int:
                rows = (
                    await metering.QueryUsage(metering_pb2.QueryUsageRequest(filter=window), metadata=a.metadata)
                ).rows
                return sum(r.event_count for r in rows) >= 3 and sum(r.event_count for r in rows)

            await until(counted)
            await asyncio.sleep(0.5)  # let any late duplicate land before the exact check
            assert await counted() == 3
            assert SECRET not in log.read_text()
        finally:
            proc.kill()
            proc.wait(timeout=10)
            await channel.close()
            tools.close()


async def _watch_rest(stub, run_id: str, after: int, metadata) -> list[pb.WatchRunResponse] | None:
    msgs = [
        m
        async for m in stub.WatchRun(pb.WatchRunRequest(run_id=run_id, after_step=after), metadata=metadata, timeout=30)
    ]
    return msgs if msgs and msgs[-1].run.status == pb.RUN_STATUS_SUCCEEDED else None
