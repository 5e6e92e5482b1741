"""`bulkhead tenants delete` and `bulkhead receipts verify` against the real mesh."""

from __future__ import annotations

import asyncio
import json

import pytest

from bulkhead.identity.v1 import identity_pb2 as idn
from bulkhead_cli import main
from bulkhead_cli.tenants import parse_duration
from testkit.fake_anthropic import FakeAnthropic
from tests.lifecycle.test_delete_mesh import addresses
from tests.services.orchestrator.mesh import running_mesh


@pytest.fixture
async def cli_mesh(tmp_path, monkeypatch, capsys):
    """The mesh, and a runner of bulkhead commands as its operator (in a thread: the servers share this loop)."""
    async with FakeAnthropic() as upstream, running_mesh(tmp_path, upstream_url=upstream.base_url) as mesh:
        mesh.identity.app.deletions.peers.update(addresses(mesh))
        for name, value in mesh.env.items():
            if name.endswith("_ADDR"):
                monkeypatch.setenv(name, value)
        monkeypatch.setenv("BULKHEAD_API_KEY", mesh.identity.operator.api_key)
        monkeypatch.delenv("BULKHEAD_TOKEN", raising=False)

        async def run(*argv: str) -> tuple[int, str, str]:
            try:
                code = await asyncio.to_thread(main, list(argv))
            except SystemExit as exc:
                code = exc.code
            out = capsys.readouterr()
            return code, out.out, out.err

        yield mesh, run


async def test_delete_now_prints_progress_saves_a_receipt_that_verifies(cli_mesh, tmp_path):
    """--now needs --yes; with it every service reports, the receipt verifies, a tampered copy fails."""
    mesh, run = cli_mesh
    t = await mesh.tenant("bridge")
    code, _, err = await run("tenants", "delete", t.tenant_id, "--now")
    assert code == 1 and "--yes" in err
    receipt = tmp_path / "receipt.json"
    code, out, err = await run("tenants", "delete", t.tenant_id, "--now", "--yes", "--receipt", str(receipt))
    assert code == 0, err
    for service in ("orchestrator", "credentials", "state", "inference", "metering", "identity"):
        assert f"{service}" in out
    assert "deletion receipt for" in out and "receipts verify" in out
    code, out, _ = await run("receipts", "verify", str(receipt))
    assert code == 0 and out.startswith("valid:")
    doc = json.loads(receipt.read_text())
    doc["receipt"]["services"][0]["rows_deleted"] += 1
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(doc))
    code, _, err = await run("receipts", "verify", str(tampered))
    assert code == 1 and "signature does not match" in err
    doc = json.loads(receipt.read_text())
    code, _, err = await run("receipts", "verify", str(receipt), "--public-key", "A" * 43 + "=")
    assert code == 2 and "not one identity vouches for" in err


async def test_delete_with_grace_suspends_and_says_how_to_cancel(cli_mesh):
    """--grace schedules: the tenant is deleting and the output names the resume command."""
    mesh, run = cli_mesh
    t = await mesh.tenant()
    code, out, _ = await run("tenants", "delete", t.tenant_id, "--grace", "7d")
    assert code == 0 and "will be deleted after" in out and f"bulkhead tenants resume {t.tenant_id}" in out
    code, out, _ = await run("tenants", "list")
    assert "deleting" in out
    code, _, err = await run("tenants", "delete", t.tenant_id, "--grace", "soon")
    assert code == 1 and "7d" in err
    code, _, err = await run("tenants", "delete", "t_nosuchtenant", "--grace", "1h")
    assert code == 1 and "not found" in err.lower()


def test_durations():
    """Durations are a positive count and one unit."""
    assert parse_duration("7d") == 7 * 86400 and parse_duration("30m") == 1800
    for bad in ("0d", "7", "d", "-1h", "1w"):
        with pytest.raises(ValueError):
            parse_duration(bad)


async def test_migrate_prints_progress_per_service_and_table(cli_mesh):
    """migrate by name to silo and back: every service's phase and tables, the pause; abort with none under way."""
    mesh, run = cli_mesh
    t = await mesh.tenant("pooled")
    name = (
        await mesh.identity.stub.GetTenant(
            idn.GetTenantRequest(tenant_id=t.tenant_id), metadata=mesh.identity.operator.metadata
        )
    ).tenant.name
    code, out, err = await run("tenants", "migrate", name, "--tier", "silo")
    assert code == 0, err
    assert "pooled -> silo" in out and "is silo now" in out and "paused" in out
    for service in ("orchestrator", "credentials", "state", "inference", "metering"):
        assert f"  {service}" in out
    assert "state: " in out and "state_events" in out and "DIFFERS" not in out and "  NO" not in out
    code, out, err = await run("tenants", "migrate", t.tenant_id, "--tier", "pooled")
    assert code == 0 and "is pooled now" in out, err
    code, _, err = await run("tenants", "migrate", t.tenant_id, "--abort")
    assert code != 0 and "no migration in progress" in err
