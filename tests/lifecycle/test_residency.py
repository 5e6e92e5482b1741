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
import functools
import sqlite3
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import hvac
import pytest
from google.protobuf import duration_pb2
from prometheus_client import CollectorRegistry
from sqlalchemy import make_url, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from bulkhead.credentials.v1 import credentials_pb2 as cred
from bulkhead.credentials.v1 import credentials_pb2_grpc
from bulkhead.identity.v1 import identity_pb2 as idn
from bulkhead.metering.v1 import metering_pb2 as met
from bulkhead.metering.v1 import metering_pb2_grpc
from bulkhead.orchestrator.v1 import orchestrator_pb2 as orch
from services.credentials.backend import TenantRef
from services.credentials.vault_layout import VaultLayout
from shared.db.router import tenant_slug
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

pytestmark = [pytest.mark.slow]

SERVICES = ("credentials", "state", "metering", "inference", "orchestrator")
REGIONS = ("us", "eu")
LOCK_WAIT = "20s"

HOME_PLATFORM_TABLES = {
    "metering_tenants": "the registry operators' all-tenant reports walk (tenant id and tier)",
    "metering_operator_audit": "operators' actions, naming the tenant they were about",
    "orch_run_queue": "the run scheduler's queue and leases (ids only, gone when the run ends)",
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
    identity_db = await postgres.create_database("rs_identity") if postgres else None
    # Each part's teardown is bounded (stop_within): identity last, the services, the orchestrator first.
    async with contextlib.AsyncExitStack() as stack:
        identity_stack = contextlib.AsyncExitStack()
        identity = await identity_stack.enter_async_context(running_identity(
            data_dir / "identity", database_url=identity_db and identity_db.app_url,
            owner_url=identity_db and identity_db.owner_url, env=regions))
        stack.push_async_callback(stop_within, "identity", identity_stack.aclose)
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
            env[f"BULKHEAD_{svc.upper()}_SERVICE_KEY_FILE"] = str(identity.service_key_file(svc))
            if postgres is None:  # embedded: <data dir>/<svc>.db, and <data dir>/regions/eu/<svc>.db
                continue
            us, eu = [await postgres.create_database(f"rs_{r}_{svc}") for r in REGIONS]
            env[f"BULKHEAD_{svc.upper()}_DATABASE_URL"] = us.app_url
            env[f"BULKHEAD_{svc.upper()}_DATABASE_OWNER_URL"] = us.owner_url
            env[f"BULKHEAD_{svc.upper()}_DATABASE_URL_EU"] = eu.app_url
            env[f"BULKHEAD_{svc.upper()}_DATABASE_OWNER_URL_EU"] = eu.owner_url
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
            stack.push_async_callback(stop_within, name, functools.partial(service.stop, 0))
            env[f"BULKHEAD_{name.upper()}_ADDR"] = service.running.address
            mesh.services[name] = service
        orchestrator_stack = contextlib.AsyncExitStack()
        stack.push_async_callback(stop_within, "orchestrator", orchestrator_stack.aclose)
        await start_orchestrator_in(mesh, orchestrator_stack)
        yield mesh


STOP_WITHIN = 30.0
"""Seconds a service's stop may take at teardown before the test reports where it is stuck."""


async def stop_within(name: str, stop: Callable[[], Awaitable[object]], seconds: float = STOP_WITHIN) -> None:
    """Await a part's stop; one stuck past `seconds` is reported with the await it hangs in and left
    behind, so the residency checks (already done) are not lost to the suite's timeout."""
    task = asyncio.ensure_future(stop())
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if done:
        task.result()
        return
    from shared.testing.hang_dump import await_chain

    where = "\n".join(await_chain(task.get_coro()))
    warnings.warn(f"{name} did not stop within {seconds:.0f} s; stuck in:\n{where}", stacklevel=1)
    task.cancel()


async def rotating_secret(channels, handle) -> None:
    """A secret with a rotation period and a superseded version: jobs in credentials' schedule."""
    stub = credentials_pb2_grpc.CredentialsServiceStub(channels["credentials"])
    for value in (b"v1", b"v2"):
        await stub.PutSecret(cred.PutSecretRequest(name="rotating", value=value,
                                                   rotation_period=duration_pb2.Duration(seconds=3600)),
                             metadata=handle.metadata)


@dataclass(frozen=True)
class Hit:
    """One table, somewhere, with a row holding the tenant's id."""

    region: str
    """us / eu (the data plane's databases and files, the tenants' own ones included), control
    (identity's), other (anything else on the cluster)."""
    store: str
    """database.schema (Postgres) or the file's path under the data dir (SQLite)."""
    table: str


def region_of_store(store: str) -> str:
    """The region a database or file belongs to, by the names the mesh gave them."""
    if store.startswith(("rs_identity", "identity/")):
        return "control"
    if store.startswith("regions/eu/"):
        return "eu"
    if "/" in store or store.endswith(".db"):
        return "us"  # the embedded default region's files: <data dir>/<svc>.db and <svc>.tenants/
    for region in REGIONS:
        if store.startswith(f"rs_{region}_"):
            return region
    return "other"


async def database_names(admin_url: str) -> set[str]:
    """Every database on the cluster now."""
    admin = create_async_engine(admin_url, poolclass=NullPool)
    try:
        async with admin.connect() as conn:
            return set((await conn.execute(text("SELECT datname FROM pg_database WHERE NOT datistemplate"))).scalars())
    finally:
        await admin.dispose()


async def postgres_tables(admin_url: str, existing: set[str]) -> AsyncIterator[tuple[str, str, list[str]]]:
    """(database.schema, table, each row as text) of every table of every database made on the cluster
    since `existing` was taken (the mesh's own and any it made anywhere), as superuser.

    Other tests' databases are left out: a session one of them leaked may hold a lock there. Each
    read commits at once (the services are live and may make tables meanwhile) and waits for a lock
    at most LOCK_WAIT, then fails naming the table and who holds it, never hangs."""
    for name in sorted(await database_names(admin_url) - existing):
        engine = create_async_engine(make_url(admin_url).set(database=name), poolclass=NullPool,
                                     isolation_level="AUTOCOMMIT")
        try:
            async with engine.connect() as conn:
                await conn.execute(text(f"SET lock_timeout = '{LOCK_WAIT}'"))
                tables = (await conn.execute(text(
                    "SELECT table_schema, table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE' "
                    "AND table_schema NOT IN ('pg_catalog', 'information_schema')"))).all()
                for schema, table in tables:
                    try:
                        rows = (await conn.execute(text(f'SELECT t::text FROM "{schema}"."{table}" t'))).scalars().all()
                    except DBAPIError as err:
                        holders = (await conn.execute(text(
                            "SELECT a.pid, a.state, a.application_name, left(a.query, 120) FROM pg_locks l "
                            "JOIN pg_stat_activity a USING (pid) WHERE l.relation = CAST(:t AS regclass) "
                            "AND l.granted AND a.pid <> pg_backend_pid()"), {"t": f'"{schema}"."{table}"'})).all()
                        raise AssertionError(f"cannot read {name}.{schema}.{table}: {err.orig}; held by {holders}") from err
                    yield f"{name}.{schema}", table, list(rows)
        finally:
            await engine.dispose()


async def sqlite_tables(data_dir: Path) -> AsyncIterator[tuple[str, str, list[str]]]:
    """The same over every SQLite file under the data dir."""
    for path in sorted(data_dir.rglob("*.db")):
        conn = sqlite3.connect(path)
        try:
            tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            for table in tables:
                rows = ["|".join(map(str, row)) for row in conn.execute(f'SELECT * FROM "{table}"')]
                yield path.relative_to(data_dir).as_posix(), table, rows
        finally:
            conn.close()


async def scan(where, needles: list[str]) -> dict[str, list[Hit]]:
    """needle -> every table (of every database or file) with a row holding it."""
    hits: dict[str, list[Hit]] = {n: [] for n in needles}
    async for store, table, rows in where:
        for needle in needles:
            if any(needle in row for row in rows):
                hits[needle].append(Hit(region_of_store(store), store, table))
    return hits


_LEDGER = ("SELECT count(*), coalesce(sum(input_tokens), 0), coalesce(sum(output_tokens), 0) "
           "FROM {table} WHERE tenant_id = {param}")


async def ledger(postgres, data_dir: Path, tenant_id: str) -> list[int]:
    """[events, input tokens, output tokens] of the tenant in metering's ledger, summed over every
    database, schema and file (as superuser): what a complete chargeback must show."""
    total = [0, 0, 0]
    if postgres is None:
        for path in [*data_dir.rglob("metering.db"), *data_dir.rglob("metering.tenants/*.db")]:
            conn = sqlite3.connect(path)
            try:
                row = conn.execute(_LEDGER.format(table="metering_usage_events", param="?"), (tenant_id,)).fetchone()
            finally:
                conn.close()
            total = [a + int(b) for a, b in zip(total, row, strict=True)]
        return total
    admin = create_async_engine(postgres.admin_url, poolclass=NullPool)
    try:
        async with admin.connect() as conn:
            names = (await conn.execute(text(
                "SELECT datname FROM pg_database WHERE datname LIKE 'rs\\_%\\_metering%'"))).scalars().all()
    finally:
        await admin.dispose()
    for name in names:
        engine = create_async_engine(admin.url.set(database=name), poolclass=NullPool)
        try:
            async with engine.connect() as conn:
                schemas = (await conn.execute(text("SELECT table_schema FROM information_schema.tables "
                                                   "WHERE table_name = 'metering_usage_events'"))).scalars().all()
                for schema in schemas:
                    sql = _LEDGER.format(table=f'"{schema}".metering_usage_events', param=":t")
                    row = (await conn.execute(text(sql), {"t": tenant_id})).one()
                    total = [a + int(b) for a, b in zip(total, row, strict=True)]
        finally:
            await engine.dispose()
    return total


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


@pytest.mark.parametrize("database, secrets_backend", [
    ("sqlite", "local"),
    pytest.param("postgres", "local", marks=pytest.mark.postgres),
    pytest.param("postgres", "vault", marks=[pytest.mark.postgres, pytest.mark.openbao]),
])
async def test_each_tenants_rows_stay_in_its_region_and_chargeback_covers_both(tmp_path, request, database,
                                                                              secrets_backend, monkeypatch):
    # metering's start() registers its metrics in the process registry: one per mesh in this process.
    monkeypatch.setattr("services.metering.server.REGISTRY", CollectorRegistry())
    postgres = request.getfixturevalue("postgres") if database == "postgres" else None
    vaults = None
    if secrets_backend == "vault":
        vaults = {"us": request.getfixturevalue("openbao"), "eu": request.getfixturevalue("second_openbao")}
    existing = await database_names(postgres.admin_url) if postgres else set()
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
                    await rotating_secret(channels, handle)
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
            for _ in range(60):
                report = await metering.ExportChargeback(request, metadata=op)
                billed = {}
                for line in report.lines:
                    acc = billed.setdefault(line.tenant_id, [0, 0, 0])
                    acc[0] += line.event_count
                    acc[1] += line.tokens.input_tokens
                    acc[2] += line.tokens.output_tokens
                expected = {h.tenant_id: await ledger(postgres, tmp_path, h.tenant_id) for h in tenants.values()}
                # Wait for the runs' model-call usage as well (delivered in batches after the run ends).
                if all(billed.get(t) == e and e[0] >= 2 for t, e in expected.items()):
                    break
                await asyncio.sleep(0.5)
            assert {t: billed.get(t) for t in expected} == expected
            for key, handle in tenants.items():
                events, _, _ = expected[handle.tenant_id]
                assert events >= 2, (key, events)  # RecordUsage's event and the run's model calls

            # Residency: a superuser reads every table of every database on the cluster (every file).
            ids = {key: h.tenant_id for key, h in tenants.items()}
            where = postgres_tables(postgres.admin_url, existing) if postgres else sqlite_tables(tmp_path)
            hits = await scan(where, list(ids.values()))
            for (region, tier), tenant_id in ids.items():
                found = hits[tenant_id]
                assert any(h.region == region for h in found), (region, tier)  # the scan sees its rows
                assert {h.region for h in found if h.table == "cred_schedule"} == {region}, (region, tier)
                misplaced = sorted(f"{h.store}.{h.table}" for h in found if h.region not in (region, "control")
                                   and not (h.region == "us" and h.table in HOME_PLATFORM_TABLES))
                assert misplaced == [], f"{region} {tier} tenant's id outside its region: {misplaced}"
                if tier != "pooled":  # its own schema, database or file: on its region's side only
                    own = {h.store for h in found if tenant_slug(tenant_id) in h.store}
                    assert own and {region_of_store(store) for store in own} == {region}, own
                if vaults:  # its Transit key (state's data keys) and secret values: its region's OpenBao only
                    other = "eu" if region == "us" else "us"
                    assert openbao_holds(vaults[region], tenant_id, tier) == (True, True), (region, tier)
                    assert openbao_holds(vaults[other], tenant_id, tier) == (False, False), (region, tier)
        finally:
            for ch in channels.values():
                await ch.close()


@pytest.mark.parametrize("database", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_deleting_a_tenant_purges_it_in_its_region(tmp_path, request, database, monkeypatch):
    """DeleteTenant --now of EU tenants of each tier: their rows, schema, database or file go from the
    EU databases (only the documented kept ledger stays, in the EU); the US bystanders are untouched."""
    from tests.lifecycle.test_delete_mesh import KEPT_TABLES, addresses, wait_done

    monkeypatch.setattr("services.metering.server.REGISTRY", CollectorRegistry())
    postgres = request.getfixturevalue("postgres") if database == "postgres" else None
    existing = await database_names(postgres.admin_url) if postgres else set()
    async with FakeAnthropic() as upstream, running_regional_mesh(tmp_path, postgres, upstream.base_url) as mesh:
        await mesh.orchestrator.dispatcher.stop()  # runs stay queued: the purge must cancel them
        mesh.identity.app.deletions.peers.update(addresses(mesh))
        named = {s: mesh.addr(s) for s in ("credentials", "state", "inference", "metering")}
        named["identity"] = mesh.identity.address
        channels = {s: grpc.aio.insecure_channel(a) for s, a in named.items()}
        op = mesh.identity.operator.metadata
        try:
            victims, bystanders = {}, {}
            for region, group in (("eu", victims), ("us", bystanders)):
                for tier in TIERS:
                    created = await mesh.identity.stub.CreateTenant(idn.CreateTenantRequest(
                        name=f"del-{region}-{tier}", tier=TIERS[tier], region=region), metadata=op)
                    group[tier] = await mesh.identity.login(created.admin_api_key)
                    await make_victim(mesh, channels, group[tier])
                    await rotating_secret(channels, group[tier])
            where = (lambda: postgres_tables(postgres.admin_url, existing)) if postgres else (lambda: sqlite_tables(tmp_path))
            ids = [t.tenant_id for t in [*victims.values(), *bystanders.values()]]
            before = await scan(where(), ids)
            assert all(any(h.region == "eu" for h in before[t.tenant_id]) for t in victims.values())

            for t in victims.values():
                await mesh.identity.stub.DeleteTenant(idn.DeleteTenantRequest(tenant_id=t.tenant_id, now=True),
                                                      metadata=op)
            for t in victims.values():
                await wait_done(mesh, t.tenant_id, timeout=120)

            after = await scan(where(), ids)
            for tier, t in victims.items():
                left = sorted(f"{h.store}.{h.table}" for h in after[t.tenant_id] if h.table not in KEPT_TABLES)
                assert left == [], (tier, left)
                assert {h.region for h in after[t.tenant_id] if h.table.startswith("metering_usage")} <= {"eu"}
                if tier != "pooled":  # its own schema, database or file is gone (the kept ledger's aside)
                    own = {h.store for h in after[t.tenant_id] if tenant_slug(t.tenant_id) in h.store}
                    assert all("metering" in store for store in own), own
            for t in bystanders.values():  # the other region's tenants: every table as before
                assert after[t.tenant_id] == before[t.tenant_id]
        finally:
            for ch in channels.values():
                await ch.close()
