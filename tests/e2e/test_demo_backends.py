"""issue 8: the demo scenario through all six services on real Postgres (RLS, app role) and OpenBao,
for pooled, bridge and silo tenants side by side on one mesh (one start: it is the slow part)."""

from __future__ import annotations

import asyncio
import re
import uuid

import asyncpg
import pytest

from shared.db.router import bridge_schema, silo_database
from tests.e2e.conftest import demo_trace_ids

TIERS = ("pooled", "bridge", "silo")


def _tenant_ids(output: str) -> list[str]:
    """The two tenant ids a demo printed while setting up."""
    return re.findall(r"^\s+(?:acme|globex)-[0-9a-f]+\s+(t_\S+)\s*$", output, re.M)


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.openbao
async def test_demo_on_postgres_and_openbao(mesh_factory, postgres, openbao):
    """Every tier's workflows succeed; rows land in Postgres under RLS, in a tenant's own schema (bridge) or
    database (silo); secrets live in OpenBao, not in any of our tables."""
    urls = await postgres.create_database(f"mesh_{uuid.uuid4().hex[:8]}")
    mesh = await asyncio.to_thread(
        mesh_factory,
        {"BULKHEAD_VAULT_TOKEN": openbao.root_token},
        ("--postgres", urls.app_url, "--postgres-owner", urls.owner_url, "--vault", openbao.url),
    )
    demos = await asyncio.gather(*(asyncio.to_thread(mesh.cli, "demo", "--tier", tier) for tier in TIERS))
    tenants: dict[str, list[str]] = {}
    for tier, demo in zip(TIERS, demos, strict=True):
        assert demo.returncode == 0, f"{tier}: {demo.stdout}{demo.stderr}"
        assert len(demo_trace_ids(demo.stdout)) == 2, demo.stdout  # both workflows succeeded
        assert "PERMISSION_DENIED" in demo.stdout and "NOT_FOUND" in demo.stdout
        assert "crm-" not in demo.stdout
        tenants[tier] = _tenant_ids(demo.stdout)
        assert len(tenants[tier]) == 2, demo.stdout

    conn = await asyncpg.connect(urls.app_dsn)
    try:
        # The runtime role sees no tenant's rows without app.tenant_id set (RLS, fail closed) ...
        assert await conn.fetchval("SELECT count(*) FROM orch_runs") == 0
        assert await conn.fetchval("SELECT count(*) FROM orch_run_queue") == 0  # every run finished and left
        # ... a pooled tenant's rows are in the shared tables, the others' are not.
        for tier, ids in tenants.items():
            async with conn.transaction():
                await conn.execute("SELECT set_config('app.tenant_id', $1, true)", ids[0])
                shared = await conn.fetchval("SELECT count(*) FROM orch_runs")
            assert shared == (1 if tier == "pooled" else 0), tier
    finally:
        await conn.close()

    admin_dsn = postgres.admin_dsn.rsplit("/", 1)[0] + "/"
    admin = await asyncpg.connect(admin_dsn + urls.name)
    try:
        for tid in tenants["bridge"]:  # bridge: a schema of its own in the main database
            assert await admin.fetchval(f'SELECT count(*) FROM "{bridge_schema(tid)}".orch_runs') == 1
        await _no_crm_token(admin, required_table="cred_secrets")
    finally:
        await admin.close()
    for tid in tenants["silo"]:  # silo: a database of its own
        silo = await asyncpg.connect(admin_dsn + silo_database(urls.name, tid))
        try:
            assert await silo.fetchval("SELECT count(*) FROM orch_runs") == 1
            await _no_crm_token(silo, required_table="orch_runs")
        finally:
            await silo.close()


async def _no_crm_token(admin: asyncpg.Connection, *, required_table: str) -> None:
    """Read every text and bytes column of every table of every schema as superuser (past RLS): no CRM
    token anywhere, because secret values live in OpenBao and state payloads are ciphertext."""
    columns = await admin.fetch(
        "SELECT table_schema, table_name, column_name, data_type FROM information_schema.columns "
        "WHERE table_schema NOT IN ('pg_catalog', 'information_schema') AND data_type IN "
        "('text', 'character varying', 'bytea', 'json', 'jsonb')"
    )
    assert any(c["table_name"] == required_table for c in columns)
    for c in columns:
        column = f'"{c["column_name"]}"' if c["data_type"] == "bytea" else f'"{c["column_name"]}"::text'
        needle = "convert_to($1, 'UTF8')" if c["data_type"] == "bytea" else "$1"
        table = f'"{c["table_schema"]}"."{c["table_name"]}"'
        hits = await admin.fetchval(f"SELECT count(*) FROM {table} WHERE position({needle} in {column}) > 0", "crm-")
        assert hits == 0, f"a CRM token is stored in clear in {table}.{c['column_name']}"
