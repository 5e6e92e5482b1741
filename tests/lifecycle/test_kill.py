"""kill -9 of identity mid-deletion under `bulkhead up`: the supervisor restarts it and the plan completes.

State is frozen (SIGSTOP) so the deletion stops after its first two steps (orchestrator, credentials);
identity is then killed with SIGKILL, state thawed. The restarted identity finds the plan in its
database, waits out the dead replica's lease and finishes: later steps run, earlier ones are not
repeated, and the receipt verifies.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from tests.e2e.conftest import start_mesh

pytestmark = pytest.mark.slow


def _steps(db, tenant_id: str) -> dict[str, tuple[int, int]]:
    with sqlite3.connect(db) as conn:
        return {
            s: (d, a)
            for s, d, a in conn.execute(
                "SELECT service, done, attempts FROM tenant_deletion_steps WHERE target_tenant = ?", (tenant_id,)
            )
        }


def _state(db, tenant_id: str) -> str | None:
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT state FROM tenant_deletions WHERE target_tenant = ?", (tenant_id,)).fetchone()
    return row[0] if row else None


def _until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_kill_9_identity_mid_deletion_then_it_completes(tmp_path):
    """Two steps done, identity SIGKILLed, restarted by the supervisor: the deletion completes once."""
    mesh = start_mesh(
        tmp_path / "mesh",
        {"BULKHEAD_IDENTITY_DELETION_INTERVAL_SECONDS": "0.5", "BULKHEAD_IDENTITY_DELETION_LEASE_SECONDS": "3"},
    )
    frozen = None
    try:
        created = mesh.cli("tenants", "create", "doomed", "--tier", "bridge")
        assert created.returncode == 0, created.stderr
        tenant_id = re.search(r"(t_[a-z0-9]+)\s+doomed", created.stdout).group(1)
        key = re.search(r"bk_t_[a-z0-9]+_k_[a-z0-9]+_[0-9a-f]{48}", created.stdout).group(0)
        put = subprocess.run(
            [
                sys.executable,
                "-m",
                "bulkhead_cli",
                "secrets",
                "put",
                "db-password",
                "--api-key",
                key,
                "--data-dir",
                str(mesh.data_dir),
            ],
            input="canary-kill-9\n",
            env=mesh.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert put.returncode == 0, put.stderr
        pids = mesh.service_pids()
        db = mesh.data_dir / "identity.db"
        frozen = pids["state"]
        os.kill(frozen, signal.SIGSTOP)
        started = mesh.cli("tenants", "delete", tenant_id, "--now", "--yes", "--timeout", "1")
        assert started.returncode == 1 and "still running" in started.stderr  # it goes on without the CLI
        _until(lambda: _steps(db, tenant_id).get("credentials", (0, 0))[0], 30, "two steps")
        assert {s for s, (done, _) in _steps(db, tenant_id).items() if done} == {"orchestrator", "credentials"}
        os.kill(pids["identity"], signal.SIGKILL)
        os.kill(frozen, signal.SIGCONT)
        frozen = None
        _until(lambda: _state(db, tenant_id) == "done", 90, "the restarted identity to finish")
        steps = _steps(db, tenant_id)
        assert all(done for done, _ in steps.values())
        assert steps["orchestrator"][1] == 0 and steps["credentials"][1] == 0  # not failed, not redone
        receipt = tmp_path / "receipt.json"
        again = mesh.cli("tenants", "delete", tenant_id, "--now", "--yes", "--receipt", str(receipt))
        assert again.returncode == 0, again.stderr
        verify = subprocess.run(
            [sys.executable, "-m", "bulkhead_cli", "receipts", "verify", str(receipt)],
            env=mesh.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert verify.returncode == 0, verify.stderr
        assert not list(mesh.data_dir.rglob(f"{tenant_id}.db")) or [
            p.parent.name for p in mesh.data_dir.rglob(f"{tenant_id}.db")
        ] == ["metering.tenants"]
        assert "canary-kill-9" not in receipt.read_text()
    finally:
        if frozen is not None:
            os.kill(frozen, signal.SIGCONT)
        mesh.stop()
