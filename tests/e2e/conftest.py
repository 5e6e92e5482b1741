"""The whole mesh under `bulkhead up` (separate processes), driven by `bulkhead demo`."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.bulkhead.test_up import _free_port_base, _wait_for


@dataclass
class Mesh:
    """A running `bulkhead up` and the environment that reaches it."""

    proc: subprocess.Popen
    env: dict[str, str]
    data_dir: Path
    lines: list[str] = field(default_factory=list)

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run a `bulkhead` command against this mesh."""
        return subprocess.run(
            [sys.executable, "-m", "bulkhead_cli", *args, "--data-dir", str(self.data_dir)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def service_pids(self) -> dict[str, int]:
        """Service name -> pid, from the status table `up` printed."""
        return {
            m.group(1): int(m.group(2))
            for m in re.finditer(
                r"^(identity|credentials|state|inference|orchestrator|metering|console)\s+\S+\s+\S+\s+(\d+)\s+healthy",
                "".join(self.lines),
                re.M,
            )
        }

    def stop(self) -> None:
        """Ctrl-C, and wait: services flush their spans on the way down."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_mesh(data_dir: Path, extra_env: dict[str, str] | None = None, up_args: tuple[str, ...] = ()) -> Mesh:
    """`bulkhead up` with every service on free ports; returns once all are healthy."""
    base = _free_port_base()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    env.pop("BULKHEAD_API_KEY", None)
    env.pop("ANTHROPIC_API_KEY", None)
    for name, port in (
        ("identity", 51),
        ("credentials", 52),
        ("state", 53),
        ("inference", 54),
        ("orchestrator", 55),
        ("metering", 56),
    ):
        env[f"BULKHEAD_{name.upper()}_ADDR"] = f"127.0.0.1:{base + port}"
        env[f"BULKHEAD_{name.upper()}_METRICS_PORT"] = str(base + 100 + port)
    env["BULKHEAD_CONSOLE_ADDR"] = f"127.0.0.1:{base + 80}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bulkhead_cli", "up", "--data-dir", str(data_dir), "--quiet", *up_args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    mesh = Mesh(proc, env, data_dir)
    try:
        _wait_for(proc, r"all services healthy", 120, mesh.lines)
    except BaseException:
        mesh.stop()
        raise
    return mesh


def demo_trace_ids(output: str) -> dict[str, str]:
    """tenant name -> trace id, from the demo's runs table."""
    return {
        m.group(1): m.group(2)
        for m in re.finditer(r"^((?:acme|globex)-[0-9a-f]+)\s+\S+\s+succeeded\s+\d+\s+([0-9a-f]{32})\s*$", output, re.M)
    }


@pytest.fixture
def mesh_factory(tmp_path):
    meshes: list[Mesh] = []

    def make(extra_env=None, up_args=()) -> Mesh:
        mesh = start_mesh(tmp_path / f"mesh{len(meshes)}", extra_env, up_args)
        meshes.append(mesh)
        return mesh

    yield make
    for mesh in meshes:
        mesh.stop()
