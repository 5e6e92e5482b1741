"""kill -9 of identity and of a service mid-migration under `bulkhead up`: the supervisor restarts them and the
migration completes with the tenant's data whole at its new tier.

State is frozen (SIGSTOP) so the copy stops after orchestrator and credentials (both pausing the tenant);
identity is SIGKILLed, then state is thawed and SIGKILLed too (its in-process pause and routing are lost).
The restarted identity finds the plan, waits out the dead replica's lease, copies every service again,
switches and releases: the tenant is bridge, its secret reads back, and the pooled tables hold none of its rows.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys

import pytest

from tests.e2e.conftest import start_mesh
from tests.lifecycle.test_kill import _until

pytestmark = pytest.mark.slow


def _phases(db, tenant_id: str) -> dict[str, str]:
    with sqlite3.connect(db) as conn:
        return dict(
            conn.execute("SELECT service, phase FROM tenant_migration_steps WHERE target_tenant = ?", (tenant_id,))
        )


def _state(db, tenant_id: str) -> str | None:
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT state FROM tenant_migrations WHERE target_tenant = ?", (tenant_id,)).fetchone()
    return row[0] if row else None


def test_kill_9_identity_and_state_mid_migration_then_it_completes(tmp_path):
    mesh = start_mesh(
        tmp_path / "mesh",
        {"BULKHEAD_IDENTITY_DELETION_INTERVAL_SECONDS": "0.5", "BULKHEAD_IDENTITY_DELETION_LEASE_SECONDS": "3"},
    )
    frozen = None
    try:
        created = mesh.cli("tenants", "create", "mover", "--tier", "pooled")
        assert created.returncode == 0, created.stderr
        tenant_id = re.search(r"(t_[a-z0-9]+)\s+mover", created.stdout).group(1)
        key = re.search(r"bk_t_[a-z0-9]+_k_[a-z0-9]+_[0-9a-f]{48}", created.stdout).group(0)

        def secrets_cli(*args: str, value: str | None = None) -> subprocess.CompletedProcess:
            return subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "bulkhead_cli",
                    "secrets",
                    *args,
                    "--api-key",
                    key,
                    "--data-dir",
                    str(mesh.data_dir),
                ],
                input=value,
                env=mesh.env,
                capture_output=True,
                text=True,
                timeout=60,
            )

        put = secrets_cli("put", "db-password", value="canary-migrate-9\n")
        assert put.returncode == 0, put.stderr
        pids = mesh.service_pids()
        db = mesh.data_dir / "identity.db"
        frozen = pids["state"]
        os.kill(frozen, signal.SIGSTOP)
        started = mesh.cli("tenants", "migrate", tenant_id, "--tier", "bridge", "--timeout", "1")
        assert started.returncode == 1 and "still running" in started.stderr, started.stderr
        _until(lambda: _phases(db, tenant_id).get("credentials") == "copied", 30, "two copies")
        assert _state(db, tenant_id) == "copying"
        os.kill(pids["identity"], signal.SIGKILL)
        os.kill(frozen, signal.SIGCONT)
        os.kill(frozen, signal.SIGKILL)
        frozen = None
        _until(lambda: _state(db, tenant_id) == "done", 120, "the restarted identity to finish")
        assert set(_phases(db, tenant_id).values()) == {"released"}
        listed = mesh.cli("tenants", "list")
        assert re.search(rf"{tenant_id}\s+mover\s+bridge", listed.stdout), listed.stdout
        got = secrets_cli("get", "db-password")
        assert got.returncode == 0 and got.stdout.strip() == "canary-migrate-9", got.stderr
        with sqlite3.connect(mesh.data_dir / "credentials.db") as conn:
            assert (
                conn.execute("SELECT count(*) FROM cred_secrets WHERE tenant_id = ?", (tenant_id,)).fetchone()[0] == 0
            )
        assert list(mesh.data_dir.glob(f"credentials.tenants/{tenant_id}.db"))
    finally:
        if frozen is not None:
            os.kill(frozen, signal.SIGCONT)
        mesh.stop()
