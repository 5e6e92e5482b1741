"""Data residency in credentials: a tenant's secrets, keys and its rotation/expiry jobs (secret names)
are in its region's database only; the scheduler runs every region's jobs."""

from __future__ import annotations

import sqlite3

import grpc
from google.protobuf import duration_pb2

from bulkhead.credentials.v1 import credentials_pb2 as pb
from bulkhead.credentials.v1 import credentials_pb2_grpc
from services.credentials.local_backend import LocalBackend
from services.credentials.master_key import load_or_create_master_key
from services.credentials.server import MIGRATIONS, serve_credentials
from shared.client import make_channel
from shared.config import RegionDatabase
from shared.db import Database

from .conftest import AUDIT_KEY, TOKENS, new_tenant


def _rows(path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(path)
    try:
        return list(conn.execute(sql))
    finally:
        conn.close()


async def test_each_tenants_schedule_stays_in_its_region_and_still_runs(tmp_path):
    us_tenant, eu_tenant = new_tenant("us"), new_tenant("eu")
    placed = {us_tenant: "us", eu_tenant: "eu"}

    async def region_of(tenant_id: str) -> str:
        return placed[tenant_id]

    us, eu = tmp_path / "us" / "credentials.db", tmp_path / "eu" / "credentials.db"
    db = await Database.open(
        f"sqlite+aiosqlite:///{us}",
        migrations=MIGRATIONS,
        region_of=region_of,
        regions={"us": None, "eu": RegionDatabase(f"sqlite+aiosqlite:///{eu}", f"sqlite+aiosqlite:///{eu}")},
    )
    backend = LocalBackend(db, load_or_create_master_key(tmp_path / "master.key"))
    service = await serve_credentials(db=db, backend=backend, verifier=TOKENS.verifier, audit_key=AUDIT_KEY)
    channel: grpc.aio.Channel = make_channel(service.running.address)
    stub = credentials_pb2_grpc.CredentialsServiceStub(channel)
    try:
        for tenant in (us_tenant, eu_tenant):
            await stub.PutSecret(
                pb.PutSecretRequest(
                    name=f"db-password-{tenant}", value=b"v1", rotation_period=duration_pb2.Duration(seconds=3600)
                ),
                metadata=TOKENS.metadata(tenant, ("*",)),
            )
        schedule = {
            region: _rows(path, "SELECT tenant_id, secret_name, kind FROM cred_schedule")
            for region, path in (("us", us), ("eu", eu))
        }
        assert schedule == {
            "us": [(us_tenant, f"db-password-{us_tenant}", "rotate")],
            "eu": [(eu_tenant, f"db-password-{eu_tenant}", "rotate")],
        }
        secrets = {
            region: {r[0] for r in _rows(path, "SELECT tenant_id FROM cred_secrets")}
            for region, path in (("us", us), ("eu", eu))
        }
        assert secrets == {"us": {us_tenant}, "eu": {eu_tenant}}

        conn = sqlite3.connect(eu)  # the EU job is due now
        with conn:
            conn.execute("UPDATE cred_schedule SET due_us = 0")
        conn.close()
        assert await service.scheduler.run_once() == 1
        got = await stub.GetSecret(
            pb.GetSecretRequest(name=f"db-password-{eu_tenant}"), metadata=TOKENS.metadata(eu_tenant, ("*",))
        )
        assert got.version == 2 and got.value != b"v1"
        # Rescheduled there: the next rotation and the superseded version's expiry.
        assert sorted(_rows(eu, "SELECT tenant_id, kind FROM cred_schedule")) == [
            (eu_tenant, "expire"),
            (eu_tenant, "rotate"),
        ]
        assert [r[0] for r in _rows(us, "SELECT tenant_id FROM cred_schedule")] == [us_tenant]
    finally:
        await channel.close()
        await service.stop(grace=0.5)
