"""issue 8: the demo scenario through all six services on real Postgres (RLS, app role) and OpenBao."""
from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from tests.e2e.conftest import demo_trace_ids


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.openbao
async def test_demo_on_postgres_and_openbao(mesh_factory, postgres, openbao):
    """Both workflows succeed; rows land in Postgres under RLS; secrets live in OpenBao, not in our tables."""
    urls = await postgres.create_database(f"mesh_{uuid.uuid4().hex[:8]}")
    mesh = await asyncio.to_thread(
        mesh_factory, {"BULKHEAD_VAULT_TOKEN": openbao.root_token},
        ("--postgres", urls.app_url, "--postgres-owner", urls.owner_url, "--vault", openbao.url))
    demo = await asyncio.to_thread(mesh.cli, "demo")
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert len(demo_trace_ids(demo.stdout)) == 2, demo.stdout
    assert "PERMISSION_DENIED" in demo.stdout and "NOT_FOUND" in demo.stdout

    conn = await asyncpg.connect(urls.app_dsn)
    try:
        # The runtime role sees no tenant's rows without app.tenant_id set (RLS, fail closed) ...
        assert await conn.fetchval("SELECT count(*) FROM orch_runs") == 0
        tenants = await conn.fetch("SELECT id FROM tenants WHERE name LIKE 'acme-%' OR name LIKE 'globex-%'")
        assert len(tenants) == 2
        async with conn.transaction():
            await conn.execute("SELECT set_config('app.tenant_id', $1, true)", tenants[0]["id"])
            assert await conn.fetchval("SELECT count(DISTINCT tenant_id) FROM orch_runs") == 1
    finally:
        await conn.close()
    # Read every text and bytes column of every table as superuser (past RLS): no CRM token anywhere,
    # because secret values live in OpenBao and state payloads are ciphertext.
    admin = await asyncpg.connect(postgres.admin_dsn.rsplit("/", 1)[0] + "/" + urls.name)
    try:
        columns = await admin.fetch("SELECT table_name, column_name, data_type FROM information_schema.columns "
                                    "WHERE table_schema = 'public' AND data_type IN ('text', 'character varying', "
                                    "'bytea', 'json', 'jsonb')")
        assert any(c["table_name"] == "cred_secrets" for c in columns)
        for c in columns:
            column = f'"{c["column_name"]}"' if c["data_type"] == "bytea" else f'"{c["column_name"]}"::text'
            needle = "convert_to($1, 'UTF8')" if c["data_type"] == "bytea" else "$1"
            hits = await admin.fetchval(
                f'SELECT count(*) FROM "{c["table_name"]}" WHERE position({needle} in {column}) > 0', "crm-")
            assert hits == 0, f"a CRM token is stored in clear in {c['table_name']}.{c['column_name']}"
    finally:
        await admin.close()
    assert "crm-" not in demo.stdout
