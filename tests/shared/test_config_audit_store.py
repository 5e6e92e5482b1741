"""shared.config_audit against a real database, SQLite and Postgres (runtime role, RLS, tiers): the
event commits with the change or not at all, and a superuser's edit or deletion of a stored event is
caught by verify at that sequence.
"""

from __future__ import annotations

import sqlite3
import urllib.parse
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import pytest

from services.inference.policy import Policy
from services.inference.server import MIGRATIONS
from services.inference.store import PolicyStore
from shared.config_audit import ConfigAudit
from shared.db import Database
from shared.tenancy import TenantContext, tenant_scope


@dataclass
class Backend:
    """One inference database and how to reach it behind the runtime role's back."""

    db: Database
    kind: str
    superuser_dsn: str = ""
    sqlite_file: str = ""

    async def execute(self, sql: str, *args) -> int:
        """Run SQL as the superuser (Postgres) or straight on the file (SQLite); the rows it touched."""
        if self.kind == "sqlite":
            with sqlite3.connect(self.sqlite_file) as conn:
                return conn.execute(sql.replace("$1", "?").replace("$2", "?"), args).rowcount
        conn = await asyncpg.connect(self.superuser_dsn)
        try:
            status = await conn.execute(sql, *args)
        finally:
            await conn.close()
        return int(status.split()[-1]) if status.split()[-1].isdigit() else 0


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def backend(request, tmp_path) -> AsyncIterator[Backend]:
    if request.param == "sqlite":
        path = tmp_path / "inference.db"
        db = await Database.open(f"sqlite+aiosqlite:///{path}", migrations=str(MIGRATIONS))
        yield Backend(db, "sqlite", sqlite_file=str(path))
    else:
        postgres = request.getfixturevalue("postgres")
        urls = await postgres.create_database(f"cfg_audit_{uuid.uuid4().hex[:8]}")
        db = await Database.open(urls.app_url, migrations=str(MIGRATIONS), owner_url=urls.owner_url)
        admin = urllib.parse.urlsplit(postgres.admin_dsn)
        yield Backend(db, "postgres", superuser_dsn=urllib.parse.urlunsplit(admin._replace(path=f"/{urls.name}")))
    await db.close()


def _tenant(tier: str = "pooled") -> TenantContext:
    return TenantContext(
        tenant_id=f"t_{uuid.uuid4().hex[:12]}", principal_id="p_admin", tier=tier, request_id=uuid.uuid4().hex
    )


async def _set(audit: ConfigAudit, store: PolicyStore, ctx: TenantContext, ceiling: int) -> None:
    with tenant_scope(ctx):
        async with audit.change(
            "model_policy.set",
            tenant_id=ctx.tenant_id,
            tier=ctx.tier,
            target=f"model_policy/{ctx.tenant_id}",
            tables={"inference_policies"},
            detail={"max_tokens_ceiling": ceiling},
        ):
            await store.put_policy(Policy(("claude-test",), "claude-test", {}, ceiling))


async def _ceiling(store: PolicyStore, ctx: TenantContext) -> int | None:
    with tenant_scope(ctx):
        policy = await store.policy()
    return policy.max_tokens_ceiling if policy else None


@pytest.mark.parametrize("tier", ["pooled", "bridge", "silo"])
async def test_each_change_appends_one_linked_event(backend: Backend, tier: str) -> None:
    """Three changes: three events 1..3 in the tenant's own store, linked, head on the last; none in another's."""
    audit, store = ConfigAudit("inference", backend.db, key=b"k" * 32), PolicyStore(backend.db)
    ctx, other = _tenant(tier), _tenant(tier)
    for ceiling in (100, 200, 300):
        await _set(audit, store, ctx, ceiling)
    rows = await audit.events(ctx.tenant_id, tier, after=None, limit=10, newest_first=False)
    assert [r["seq"] for r in rows] == [1, 2, 3]
    assert [r["detail"]["max_tokens_ceiling"] for r in rows] == ["100", "200", "300"]
    assert rows[1]["prev_hash"] == rows[0]["hash"] and rows[2]["prev_hash"] == rows[1]["hash"]
    report, head = await audit.verify(ctx.tenant_id, tier)
    assert report.intact and report.checked == 3 and head == (3, rows[2]["hash"])
    assert await audit.events(other.tenant_id, tier, after=None, limit=10, newest_first=False) == []


async def test_the_change_and_its_event_commit_together(backend: Backend) -> None:
    """When the event cannot be written, the change is rolled back with it: nothing half-written."""
    audit, store = ConfigAudit("inference", backend.db), PolicyStore(backend.db)
    ctx = _tenant()
    await _set(audit, store, ctx, 100)
    if backend.kind == "sqlite":
        await backend.execute(
            "CREATE TRIGGER no_audit BEFORE INSERT ON inference_config_audit_events "
            "BEGIN SELECT RAISE(ABORT, 'audit refused'); END"
        )
    else:
        await backend.execute(
            "CREATE FUNCTION no_audit() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'audit refused'; END $$"
        )
        await backend.execute(
            "CREATE TRIGGER no_audit BEFORE INSERT ON inference_config_audit_events "
            "FOR EACH ROW EXECUTE FUNCTION no_audit()"
        )
    with pytest.raises(Exception, match="audit refused"):
        await _set(audit, store, ctx, 999)
    assert await _ceiling(store, ctx) == 100
    assert (await audit.verify(ctx.tenant_id, "pooled"))[1][0] == 1


@pytest.mark.parametrize("tamper", ["update", "delete", "delete_last"])
async def test_tampering_as_superuser_is_caught(backend: Backend, tamper: str) -> None:
    """A changed field, a removed middle event or a removed newest event: verify names the sequence."""
    audit, store = ConfigAudit("inference", backend.db, key=b"k" * 32), PolicyStore(backend.db)
    ctx = _tenant()
    for ceiling in (100, 200, 300):
        await _set(audit, store, ctx, ceiling)
    table = "inference_config_audit_events"
    if tamper == "update":
        touched = await backend.execute(
            f"UPDATE {table} SET detail = $1 WHERE tenant_id = $2 AND seq = 2",
            '{"max_tokens_ceiling":"999999"}',
            ctx.tenant_id,
        )
        expected, words = 2, "changed"
    elif tamper == "delete":
        touched = await backend.execute(f"DELETE FROM {table} WHERE tenant_id = $1 AND seq = 2", ctx.tenant_id)
        expected, words = 2, "missing"
    else:
        touched = await backend.execute(f"DELETE FROM {table} WHERE tenant_id = $1 AND seq = 3", ctx.tenant_id)
        expected, words = 3, "head records 3"
    assert touched == 1
    report, _ = await audit.verify(ctx.tenant_id, "pooled")
    assert not report.intact
    assert report.first_bad_sequence == expected and words in report.problem, report


async def test_concurrent_changes_of_one_tenant_chain_in_order(backend: Backend) -> None:
    """Twelve changes at once: twelve events 1..12, one chain, intact (the head row serialises appends)."""
    import asyncio

    from services.inference.policy import PrivateModel

    audit, store = ConfigAudit("inference", backend.db), PolicyStore(backend.db)
    ctx = _tenant()

    async def register(n: int) -> None:
        with tenant_scope(ctx):
            async with audit.change_own(
                "private_model.register", target=f"private_model/m{n}", tables={"inference_private_models"}
            ):
                await store.add_private_model(PrivateModel(f"m{n}", "llama", "https://models.example/v1", "x"))

    await asyncio.gather(*(register(n) for n in range(12)))
    rows = await audit.events(ctx.tenant_id, "pooled", after=None, limit=50, newest_first=False)
    assert [r["seq"] for r in rows] == list(range(1, 13))
    assert sorted(r["target"] for r in rows) == sorted(f"private_model/m{n}" for n in range(12))
    report, head = await audit.verify(ctx.tenant_id, "pooled")
    assert report.intact and head[0] == 12


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def identity_db(request, tmp_path) -> AsyncIterator[Database]:
    from services.identity.server import MIGRATIONS as IDENTITY_MIGRATIONS

    if request.param == "sqlite":
        db = await Database.open(f"sqlite+aiosqlite:///{tmp_path / 'identity.db'}", migrations=IDENTITY_MIGRATIONS)
    else:
        urls = await request.getfixturevalue("postgres").create_database(f"cfg_id_{uuid.uuid4().hex[:8]}")
        db = await Database.open(urls.app_url, migrations=IDENTITY_MIGRATIONS, owner_url=urls.owner_url)
    yield db
    await db.close()


async def test_a_change_in_a_platform_session_goes_to_the_named_tenants_chain(identity_db: Database) -> None:
    """identity's tenant status lives in a platform table written by a system session: its event still lands
    on that tenant's chain (under RLS on Postgres), with the operator as actor."""
    from services.identity.directory import Directory
    from shared.tiers import Tier

    audit = ConfigAudit("identity", identity_db, rows_tier=Tier.POOLED)
    directory = Directory(identity_db)
    operator = TenantContext("t_platform", "p_operator", scopes=frozenset({"platform.operator", "*"}))
    with tenant_scope(operator):
        created = await directory.create_tenant(f"acme-{uuid.uuid4().hex[:6]}", "bridge", "")
        tid = created.tenant.id
        async with audit.change(
            "tenant.suspend", tenant_id=tid, target=f"tenant/{tid}", tables={"tenants"}, detail={"status": "suspended"}
        ):
            await directory.set_tenant_status(tid, "suspended")
    rows = await audit.events(tid, "pooled", after=None, limit=10, newest_first=False)
    assert [(r["action"], r["operator_id"]) for r in rows] == [("tenant.suspend", "p_operator")]
    assert (await audit.verify(tid, "pooled"))[0].intact


def test_details_never_carry_a_secret() -> None:
    """A key named like a secret, an API key, a JWT or a provider key in a value is stored redacted."""
    from shared.config_audit import REDACTED, secret_free

    detail = secret_free(
        {
            "secret": "x",
            "display_name": "bk_t_abc_k_def_s3cr3t",
            "note": "eyJhbGciOiJFZERTQSJ9.e30",
            "provider": "sk-ant-0123456789",
            "scopes": ["state.*", "credentials.*"],
            "limit": 5,
        }
    )
    assert detail == {
        "secret": REDACTED,
        "display_name": REDACTED,
        "note": REDACTED,
        "provider": REDACTED,
        "scopes": "credentials.*,state.*",
        "limit": "5",
    }
