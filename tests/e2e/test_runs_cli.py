"""issue 13: the README's tour on the embedded defaults (`bulkhead up`, SQLite) for a tenant of every tier,
and `bulkhead runs start` on a run that has to wait in the queue."""

from __future__ import annotations

import asyncio
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

TIERS = ("pooled", "bridge", "silo")


class SlowTool:
    """An HTTP tool on loopback that holds every request until released (at most 25 s)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.requests = 0
        tool = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # http.server's name
                tool.requests += 1
                tool.release.wait(25)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"ok": true}')

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()


def _team_yaml(tool_host: str) -> str:
    return (
        f"name: desk\nallowed_hosts: ['{tool_host}']\nagents:\n  - name: solo\n    model: claude-sonnet-4-5\n"
        f"    system_prompt: Check, then answer.\n    tools: [check]\n"
        f"http_tools:\n  - name: check\n    description: Check something\n    method: GET\n"
        f"    url: http://{tool_host}/check\n"
    )


@pytest.mark.slow
async def test_tour_for_every_tier_and_a_queued_run_gives_up_with_advice(mesh_factory, tmp_path):
    """tenants create --tier X, teams apply, runs start: succeeds for pooled, bridge and silo; a run that
    waits behind the tenant's limit is reported queued (position, limit) and the command gives up after --wait."""
    tool = SlowTool()
    try:
        mesh = await asyncio.to_thread(
            mesh_factory, {"BULKHEAD_ORCHESTRATOR_RUNS_PER_TENANT": "1", "BULKHEAD_ORCHESTRATOR_TOOL_TIMEOUT": "30"}
        )
        team_file = tmp_path / "team.yaml"
        team_file.write_text(_team_yaml(tool.host))
        tool.release.set()  # the tour's runs go straight through
        keys = {}
        for tier in TIERS:
            created = await asyncio.to_thread(mesh.cli, "tenants", "create", f"acme-{tier}", "--tier", tier)
            assert created.returncode == 0, created.stderr
            keys[tier] = re.search(r"bk_t_[a-z0-9]+_k_[a-z0-9]+_[0-9a-f]{48}", created.stdout).group(0)
            as_tenant = ("--api-key", keys[tier])
            applied = await asyncio.to_thread(mesh.cli, "teams", "apply", "-f", str(team_file), *as_tenant)
            assert applied.returncode == 0, applied.stderr
            run = await asyncio.to_thread(mesh.cli, "runs", "start", "desk", "hello", *as_tenant, timeout=60)
            assert run.returncode == 0, f"{tier}: {run.stdout}{run.stderr}"
            assert "succeeded" in run.stdout and "tool_call" in run.stdout

        # The tenant's one slot is taken by a run held in its tool call; the next run has to queue.
        tool.release.clear()
        seen = tool.requests
        as_bridge = ("--api-key", keys["bridge"])
        first = await asyncio.to_thread(mesh.cli, "runs", "start", "desk", "first", "--detach", *as_bridge)
        assert first.returncode == 0, first.stderr
        while tool.requests == seen:
            await asyncio.sleep(0.05)
        second = await asyncio.to_thread(mesh.cli, "runs", "start", "desk", "second", "--wait", "2", *as_bridge)
        assert second.returncode == 3, second.stdout + second.stderr
        run_id = re.search(r"^run (r_[0-9a-f]+) queued", second.stdout, re.M).group(1)
        assert (
            "queued: position 1 in this tenant's queue; 1 of 1 concurrent runs in use, so it waits for one "
            "of them to finish"
        ) in second.stdout
        assert f"run {run_id} is still queued after 2s" in second.stderr
        assert f"bulkhead runs watch {run_id}" in second.stderr and f"bulkhead runs cancel {run_id}" in second.stderr
        assert "Traceback" not in second.stderr

        # It stayed queued, and runs once the slot frees.
        tool.release.set()
        watched = await asyncio.to_thread(mesh.cli, "runs", "watch", run_id, *as_bridge, timeout=60)
        assert watched.returncode == 0 and f"run {run_id} succeeded" in watched.stdout, watched.stdout + watched.stderr
    finally:
        tool.close()
