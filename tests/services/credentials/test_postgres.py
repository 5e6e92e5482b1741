"""The credentials tables on PostgreSQL as the app role: migrations, grants and row-level security."""

from __future__ import annotations

import grpc
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from bulkhead.credentials.v1 import credentials_pb2 as pb
from bulkhead.credentials.v1 import credentials_pb2_grpc
from services.credentials.local_backend import LocalBackend
from services.credentials.master_key import load_or_create_master_key
from services.credentials.server import MIGRATIONS, serve_credentials
from shared.client import make_channel
from shared.db import Database
from tests.services.credentials.conftest import (
    TOKENS,
    Harness,
    expect_error,
    new_tenant,
)


@pytest.fixture
async def ph(postgres, tmp_path):
    """A local-backend harness on a fresh Postgres database, connected as the app role."""
    urls = await postgres.create_database("credentials")
    db = await Database.open(urls.app_url, migrations=str(MIGRATIONS), owner_url=urls.owner_url)
    service = await serve_credentials(
        db=db, backend=LocalBackend(db, load_or_create_master_key(tmp_path / "mk")), verifier=TOKENS.verifier
    )
    channel = make_channel(service.running.address)
    h = Harness(
        service,
        channel,
        credentials_pb2_grpc.CredentialsServiceStub(channel),
        TOKENS,
        "local",
        new_tenant("a"),
        new_tenant("b"),
    )
    try:
        yield h
    finally:
        await channel.close()
        await service.stop(grace=0.5)


async def test_secrets_and_audit_work_on_postgres(ph):
    """Put/Get/rotate, cross-tenant NOT_FOUND and an intact audit chain, on Postgres."""
    await ph.put("pg-secret", b"pg-value-1")
    await ph.stub.RotateSecret(pb.RotateSecretRequest(name="pg-secret"), metadata=ph.md())
    assert (await ph.get("pg-secret", version=1)).value == b"pg-value-1"
    details, _ = await expect_error(grpc.StatusCode.NOT_FOUND, ph.get("pg-secret", tenant=ph.beta))
    assert details["reason"] == "SECRET_NOT_FOUND"
    report = await ph.stub.VerifyAccessEvents(pb.VerifyAccessEventsRequest(), metadata=ph.md())
    assert report.intact and report.events_checked == 3


async def test_raw_sql_as_the_app_role_sees_only_its_tenant(ph):
    """Past the ORM, RLS still confines the app role: no tenant set sees nothing, A sees only A."""
    await ph.put("a-secret", b"a-value")
    await ph.put("b-secret", b"b-value", tenant=ph.beta)
    tables = (
        "cred_secrets",
        "cred_secret_versions",
        "cred_audit_events",
        "cred_audit_heads",
        "cred_local_keys",
        "cred_local_values",
    )
    async with ph.service.db.engine.connect() as conn:
        for table in tables:
            assert (await conn.execute(text(f"SELECT count(*) FROM {table}"))).scalar() == 0, table
        await conn.execute(text("SELECT set_config('app.tenant_id', :t, true)"), {"t": ph.alpha})
        tenants = {r[0] for table in tables for r in await conn.execute(text(f"SELECT tenant_id FROM {table}"))}
        assert tenants == {ph.alpha}
        with pytest.raises(DBAPIError):  # WITH CHECK: the app role cannot write a row for another tenant
            await conn.execute(
                text("INSERT INTO cred_audit_heads (tenant_id, seq, hash) VALUES (:t, 1, 'x')"), {"t": ph.beta}
            )
        await conn.rollback()


async def test_two_replicas_share_one_audit_chain_on_postgres(postgres):
    """Raw appends as the app role under RLS: two AuditLogs (two replicas) interleave on one chain;
    stale cached heads are retried and the chain verifies."""
    from services.credentials.audit import AuditLog
    from shared.tenancy import TenantContext, tenant_scope
    from tests.services.credentials.test_audit import alternate_appends_make_one_chain

    urls = await postgres.create_database("credentials_replicas")
    db = await Database.open(urls.app_url, migrations=str(MIGRATIONS), owner_url=urls.owner_url)
    first, second = AuditLog(db, b"k" * 32), AuditLog(db, b"k" * 32)
    try:
        with tenant_scope(TenantContext(new_tenant("r"), "p_test", request_id="r")):
            await alternate_appends_make_one_chain(first, second)
    finally:
        await first.close()
        await second.close()
        await db.close()
