"""Data residency on the whole mesh: two regions, "us" (the default) and "eu", each with a real
Postgres database per service (two databases of one cluster per service; silo databases and bridge
schemas are made beside them). A pooled, a bridge and a silo tenant in each region run a workload
through the real services (secrets, ciphertext, teams, runs that call the model, state events and
snapshots, context, private models, usage, budget holds). Then a superuser reads every table of
every database: each tenant's id is in its own region's databases only, apart from identity's
directory (the control plane) and the documented platform tables of the default region (queues and
registries that hold ids, docs/CONTRACT.md "Data residency"). The operator's chargeback covers the
tenants of both regions, each with exactly its ledger.
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import hvac
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from bulkhead.identity.v1 import identity_pb2 as idn
from bulkhead.metering.v1 import metering_pb2 as met
from bulkhead.metering.v1 import metering_pb2_grpc
from bulkhead.orchestrator.v1 import orchestrator_pb2 as orch
from services.credentials.backend import TenantRef
from services.credentials.vault_layout import VaultLayout
from shared.testing.fake_anthropic import FakeAnthropic
from shared.testing.identity import running_identity
from shared.testing.openbao import OpenBaoServer, start_openbao
from tests.isolation.resources import make_victim
from tests.services.orchestrator.mesh import (
    TIERS,
    Mesh,
    _close_channels,
    start_orchestrator_in,
)

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

SERVICES = ("credentials", "state", "metering", "inference", "orchestrator")
REGIONS = ("us", "eu")

HOME_PLATFORM_TABLES = {
    "metering_tenants": "the registry operators' all-tenant reports walk (tenant id and tier)",
    "metering_operator_audit": "operators' actions, naming the tenant they were about",
    "orch_run_queue": "the run scheduler's queue and leases (ids only, gone when the run ends)",
    "cred_schedule": "the rotation/expiry scheduler's queue (secret names and due times, no values)",
    "inference_usage_outbox": "usage not yet acknowledged by metering (gone once delivered)",
    "inference_attempts": "the write-ahead attempt journal (model and token counts; done rows pruned after "
                          "its retention)",
}
"""Platform tables of the default region that may name a tenant of another region: each service's
cross-tenant workers read them with no tenant set (tests/rls/test_conformance.py). Everything a
tenant owns (every tenant_id table under RLS) is in its region only."""


@contextlib.asynccontextmanager
async def running_regional_mesh(data_dir: Path, postgres, upstream_url: str,
                                vaults: dict[str, OpenBaoServer] | None = None) -> AsyncIterator[Mesh]:
    """identity (the control plane, one database) and the five data-plane services with a database
    in each region, configured as an operator would (BULKHEAD_REGIONS, ..._DATABASE_URL_EU); with
    `vaults`, credentials keeps secrets and keys in each region's OpenBao (else sealed in its database)."""
    regions = {"BULKHEAD_REGIONS": ",".join(REGIONS), "BULKHEAD_DEFAULT_REGION": "us"}
    identity_db = await postgres.create_database("rs_identity")
    async with running_identity(data_dir / "identity", database_url=identity_db.app_url,
                                owner_url=identity_db.owner_url, env=regions) as identity, \
            contextlib.AsyncExitStack() as stack:
        env = {**regions, "BULKHEAD_DATA_DIR": str(data_dir), "BULKHEAD_IDENTITY_ADDR": identity.address,
               "BULKHEAD_STATE_ENCRYPTION": "credentials", "BULKHEAD_SECRETS_BACKEND": "vault" if vaults else "local",
               "BULKHEAD_LOG_LEVEL": "WARNING", "BULKHEAD_MODEL_PROVIDER": "anthropic",
               "ANTHROPIC_BASE_URL": upstream_url, "ANTHROPIC_API_KEY": "sk-platform-test",
               "BULKHEAD_INFERENCE_ALLOWED_MODELS": "claude-test"}
        for svc in ("identity", *SERVICES):
            env[f"BULKHEAD_{svc.upper()}_METRICS_PORT"] = "0"
        if vaults:
            env.update({"BULKHEAD_VAULT_ADDR": vaults["us"].url, "BULKHEAD_VAULT_TOKEN": vaults["us"].root_token,
                        "BULKHEAD_VAULT_ADDR_EU": vaults["eu"].url, "BULKHEAD_VAULT_TOKEN_EU": vaults["eu"].root_token})
        for svc in SERVICES:
            us, eu = [await postgres.create_database(f"rs_{r}_{svc}") for r in REGIONS]
            env[f"BULKHEAD_{svc.upper()}_DATABASE_URL"] = us.app_url
            env[f"BULKHEAD_{svc.upper()}_DATABASE_OWNER_URL"] = us.owner_url
            env[f"BULKHEAD_{svc.upper()}_DATABASE_URL_EU"] = eu.app_url
            env[f"BULKHEAD_{svc.upper()}_DATABASE_OWNER_URL_EU"] = eu.owner_url
            env[f"BULKHEAD_{svc.upper()}_SERVICE_KEY_FILE"] = str(identity.service_key_file(svc))
        mesh = Mesh(identity, env)
        stack.push_async_callback(_close_channels, mesh)

        from services.credentials.config import Config as CredentialsConfig
        from services.credentials.server import start as start_credentials
        from services.inference.config import InferenceConfig
        from services.inference.server import start as start_inference
        from services.metering.config import MeteringConfig
        from services.metering.server import start as start_metering
        from services.state.config import StateConfig
        from services.state.server import start as start_state

        starts = (("credentials", lambda: start_credentials(CredentialsConfig.from_env(env), mesh.verifier(),
                                                             address="127.0.0.1:0")),
                  ("metering", lambda: start_metering(MeteringConfig.from_env(env), mesh.verifier(),
                                                      address="127.0.0.1:0")),
                  ("state", lambda: start_state(StateConfig.from_env(env), mesh.verifier(), address="127.0.0.1:0")),
                  ("inference", lambda: start_inference(InferenceConfig.from_env(env), mesh.verifier(),
                                                        address="127.0.0.1:0")))
        for name, start in starts:
            service = await start()
            stack.push_async_callback(service.stop, 0)
            env[f"BULKHEAD_{name.upper()}_ADDR"] = service.running.address
            mesh.services[name] = service
        await start_orchestrator_in(mesh, stack)
        yield mesh


async def superuser_tables(admin_url: str, needles: list[str]) -> dict[str, set[str]]:
    """needle -> every database.schema.table (of every database on the cluster) with a row holding it."""
    hits: dict[str, set[str]] = {n: set() for n in needles}
    admin = create_async_engine(admin_url, poolclass=NullPool)
    try:
        async with admin.connect() as conn:
            names = (await conn.execute(text("SELECT datname FROM pg_database WHERE NOT datistemplate"))).scalars().all()
    finally:
        await admin.dispose()
    for name in names:
        engine = create_async_engine(admin.url.set(database=name), poolclass=NullPool)
        try:
            async with engine.connect() as conn:
                tables = (await conn.execute(text(
                    "SELECT table_schema, table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE' "
                    "AND table_schema NOT IN ('pg_catalog', 'information_schema')"))).all()
                for schema, table in tables:
                    for (row,) in await conn.execute(text(f'SELECT t::text FROM "{schema}"."{table}" t')):
                        for needle in needles:
                            if needle in row:
                                hits[needle].add(f"{name}.{schema}.{table}")
        finally:
            await engine.dispose()
    return hits


async def ledger(admin_url: str, tenant_id: str) -> tuple[int, int, int]:
    """(events, input tokens, output tokens) of the tenant in metering's ledger, summed over every
    database and schema as superuser: what a complete chargeback must show."""
    admin = create_async_engine(admin_url, poolclass=NullPool)
    try:
        async with admin.connect() as conn:
            names = (await conn.execute(text(
                "SELECT datname FROM pg_database WHERE datname LIKE 'rs\\_%\\_metering%'"))).scalars().all()
    finally:
        await admin.dispose()
    total = [0, 0, 0]
    for name in names:
        engine = create_async_engine(admin.url.set(database=name), poolclass=NullPool)
        try:
            async with engine.connect() as conn:
                schemas = (await conn.execute(text("SELECT table_schema FROM information_schema.tables "
                                                   "WHERE table_name = 'metering_usage_events'"))).scalars().all()
                for schema in schemas:
                    row = (await conn.execute(text(
                        f'SELECT count(*), coalesce(sum(input_tokens), 0), coalesce(sum(output_tokens), 0) '
                        f'FROM "{schema}".metering_usage_events WHERE tenant_id = :t'), {"t": tenant_id})).one()
                    total = [a + int(b) for a, b in zip(total, row)]
        finally:
            await engine.dispose()
    return total[0], total[1], total[2]


def region_of_database(name: str) -> str:
    """us / eu for the data plane's databases (silo ones included), control for identity's, other otherwise."""
    if name.startswith("rs_identity"):
        return "control"
    for region in REGIONS:
        if name.startswith(f"rs_{region}_"):
            return region
    return "other"


async def wait_runs_done(mesh: Mesh, tenants: dict, runs: dict, timeout: float = 90.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    for key, handle in tenants.items():
        while True:
            run = (await mesh.stub.GetRun(orch.GetRunRequest(run_id=runs[key]), metadata=handle.metadata)).run
            if run.status in (orch.RUN_STATUS_SUCCEEDED, orch.RUN_STATUS_FAILED, orch.RUN_STATUS_CANCELLED):
                assert run.status == orch.RUN_STATUS_SUCCEEDED, f"{key}: {run.error_reason} {run.error_message}"
                break
            assert asyncio.get_running_loop().time() < deadline, f"run of {key} still {run.status}"
            await asyncio.sleep(0.3)


def openbao_holds(server: OpenBaoServer, tenant_id: str, tier: str) -> tuple[bool, bool]:
    """(its Transit key exists, its KV folder has secrets) in this OpenBao, read with the root token."""
    layout, ref = VaultLayout(), TenantRef(tenant_id, tier)
    client = hvac.Client(url=server.url, token=server.root_token, namespace=layout.namespace(ref))
    try:
        client.secrets.transit.read_key(layout.key_name(ref), mount_point=layout.transit_mount)
        key = True
    except (hvac.exceptions.InvalidPath, hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden):
        key = False
    try:
        listed = client.secrets.kv.v2.list_secrets(path=layout.prefix(ref), mount_point=layout.kv_mount)
        values = bool(listed["data"]["keys"])
    except (hvac.exceptions.InvalidPath, hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden):
        values = False
    return key, values


@pytest.fixture
def second_openbao():
    """Another OpenBao dev server: the EU region's (a cluster of its own, as in production)."""
    server = start_openbao()
    try:
        yield server
    finally:
        server.close()


@pytest.mark.parametrize("secrets_backend", ["local", pytest.param("vault", marks=pytest.mark.openbao)])
async def test_each_tenants_rows_stay_in_its_region_and_chargeback_covers_both(tmp_path, postgres, request,
                                                                              secrets_backend, monkeypatch):
    # metering's start() registers its metrics in the process registry: one per mesh in this process.
    monkeypatch.setattr("services.metering.server.REGISTRY", CollectorRegistry())
    vaults = None
    if secrets_backend == "vault":
        vaults = {"us": request.getfixturevalue("openbao"), "eu": request.getfixturevalue("second_openbao")}
    async with FakeAnthropic() as upstream, \
            running_regional_mesh(tmp_path, postgres, upstream.base_url, vaults) as mesh:
        named = {s: mesh.addr(s) for s in ("credentials", "state", "inference", "metering")}
        named["identity"] = mesh.identity.address
        channels = {s: grpc.aio.insecure_channel(a) for s, a in named.items()}
        op = mesh.identity.operator.metadata
        try:
            start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
            tenants, runs = {}, {}
            for region in REGIONS:
                for tier in TIERS:
                    created = await mesh.identity.stub.CreateTenant(idn.CreateTenantRequest(
                        name=f"rs-{region}-{tier}", tier=TIERS[tier], region=region), metadata=op)
                    assert created.tenant.region == region
                    handle = await mesh.identity.login(created.admin_api_key)
                    tenants[(region, tier)] = handle
                    ids = await make_victim(mesh, channels, handle)
                    runs[(region, tier)] = ids.run_id
            await wait_runs_done(mesh, tenants, runs)

            # Unknown region: refused, nothing created.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await mesh.identity.stub.CreateTenant(idn.CreateTenantRequest(name="rs-mars", region="mars"),
                                                      metadata=op)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "us, eu" in err.value.details()

            # Chargeback: the operator's all-tenant export lists every tenant of both regions with
            # exactly its ledger (usage is delivered asynchronously: wait until the two agree).
            metering = metering_pb2_grpc.MeteringServiceStub(channels["metering"])
            request = met.ExportChargebackRequest(period=met.CHARGEBACK_PERIOD_DAY)
            request.start_time.FromDatetime(start)
            request.end_time.FromDatetime(dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
            for attempt in range(60):
                report = await metering.ExportChargeback(request, metadata=op)
                billed = {}
                for line in report.lines:
                    acc = billed.setdefault(line.tenant_id, [0, 0, 0])
                    acc[0] += line.event_count
                    acc[1] += line.tokens.input_tokens
                    acc[2] += line.tokens.output_tokens
                expected = {h.tenant_id: list(await ledger(postgres.admin_url, h.tenant_id)) for h in tenants.values()}
                if all(billed.get(t) == e for t, e in expected.items()):
                    break
                await asyncio.sleep(0.5)
            assert {t: billed.get(t) for t in expected} == expected
            for (region, tier), handle in tenants.items():
                events, _, _ = expected[handle.tenant_id]
                assert events >= 2, (region, tier, events)  # RecordUsage's event and the run's model calls

            # Residency: a superuser reads every table of every database on the cluster.
            ids = {key: h.tenant_id for key, h in tenants.items()}
            hits = await superuser_tables(postgres.admin_url, list(ids.values()))
            for (region, tier), tenant_id in ids.items():
                where = hits[tenant_id]
                regions = {region_of_database(h.split(".")[0]) for h in where}
                assert region in regions, (region, tier)  # the scan does see the tenant's rows
                misplaced = sorted(h for h in where if region_of_database(h.split(".")[0]) not in (region, "control")
                                   and not (region_of_database(h.split(".")[0]) == "us"
                                            and h.split(".")[2] in HOME_PLATFORM_TABLES))
                assert misplaced == [], f"{region} {tier} tenant's id outside its region: {misplaced}"
                if region == "eu":  # no tenant-owned table of the US databases names it
                    assert {h.split(".")[2] for h in where if h.startswith("rs_us_")} <= set(HOME_PLATFORM_TABLES)
                if tier == "silo":  # its own databases, on its region's side
                    own = {h.split(".")[0] for h in where if tenant_id.lower() in h.split(".")[0]}
                    assert own and all(name.startswith(f"rs_{region}_") for name in own), own
                if tier == "bridge":
                    schemas = {h.split(".")[0] for h in where if h.split(".")[1].startswith("tenant_")}
                    assert schemas and all(name.startswith(f"rs_{region}_") for name in schemas), schemas
                if vaults:  # its Transit key (state's data keys) and secret values: its region's OpenBao only
                    other = "eu" if region == "us" else "us"
                    assert openbao_holds(vaults[region], tenant_id, tier) == (True, True), (region, tier)
                    assert openbao_holds(vaults[other], tenant_id, tier) == (False, False), (region, tier)
        finally:
            for ch in channels.values():
                await ch.close()
