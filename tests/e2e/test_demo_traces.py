"""issue 8: the demo runs through all six services; one workflow is one trace across all of them."""

from __future__ import annotations

import asyncio
import time

import pytest

from testkit.otlp import OtlpReceiver
from tests.bulkhead.test_up import _alive
from tests.e2e.conftest import demo_trace_ids

SERVICES = {"identity", "credentials", "state", "inference", "orchestrator", "metering"}
TIERS = ("pooled", "bridge", "silo")


@pytest.mark.slow
async def test_demo_is_one_trace_per_workflow_across_all_services(mesh_factory):
    """The demo for pooled, bridge and silo tenants at once on one mesh (SQLite): every workflow succeeds;
    spans reach an OTLP receiver; each workflow's trace spans all six services with tenant.id, and no secret."""
    receiver = await OtlpReceiver().start()
    try:
        env = {"BULKHEAD_OTLP_ENDPOINT": receiver.endpoint}
        mesh = await asyncio.to_thread(mesh_factory, env)
        demos = await asyncio.gather(*(asyncio.to_thread(mesh.cli, "demo", "--tier", tier) for tier in TIERS))
        traces = {}
        for tier, demo in zip(TIERS, demos, strict=True):
            assert demo.returncode == 0, f"{tier}: {demo.stdout}{demo.stderr}"
            assert f"two {tier} tenants" in demo.stdout
            assert len(demo_trace_ids(demo.stdout)) == 2, demo.stdout  # both workflows succeeded
            traces.update(demo_trace_ids(demo.stdout))
        assert len(traces) == 6
        pids = mesh.service_pids()
        assert set(pids) == SERVICES | {"console"}  # the console is a process of its own, outside the traces
        await asyncio.to_thread(mesh.stop)  # Ctrl-C; services flush their span batches when they stop
        assert mesh.proc.returncode == 0
        survivors = [name for name, pid in pids.items() if _alive(pid)]
        assert not survivors, f"still running after Ctrl-C: {survivors}"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not all(
            {s.service.removeprefix("bulkhead-") for s in receiver.trace(t)} >= SERVICES for t in traces.values()
        ):
            await asyncio.sleep(0.5)
    finally:
        await receiver.stop()

    tenant_ids = {}
    for line in "".join(d.stdout for d in demos).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in traces and parts[1].startswith("t_"):
            tenant_ids[parts[0]] = parts[1]
    for name, trace_id in traces.items():
        spans = receiver.trace(trace_id)
        services = {s.service.removeprefix("bulkhead-") for s in spans}
        assert services >= SERVICES, f"{name}: trace {trace_id} covers only {sorted(services)}"
        ids = {s.span_id for s in spans}
        roots = [s for s in spans if not s.parent_span_id]
        assert len(roots) == 1 and roots[0].name == "demo.workflow", [r.name for r in roots]
        orphans = [(s.service, s.name) for s in spans if s.parent_span_id and s.parent_span_id not in ids]
        assert not orphans, f"spans whose parent never arrived: {orphans}"
        server_spans = [s for s in spans if s.kind == 2 and "tenant.id" in s.attributes]
        assert server_spans and {s.attributes["tenant.id"] for s in server_spans} == {tenant_ids[name]}
        attrs = " ".join(f"{k}={v}" for s in spans for k, v in s.attributes.items())
        assert "crm-" not in attrs and "Bearer" not in attrs and "bk_t_" not in attrs
    # The bridge and silo tenants' runs are in SQLite files of their own (the queue is not: they ran).
    assert len(list(mesh.data_dir.glob("orchestrator.tenants/*.db"))) == 4
