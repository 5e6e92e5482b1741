"""TenantSession through Database.session(): reads, writes and bulk statements stay in one tenant."""

from __future__ import annotations

import pytest
from sqlalchemy import delete, func, insert, select, text, update
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import make_transient_to_detached
from sqlalchemy.orm.exc import ObjectDeletedError

from shared.db import Database, NoTenantContext, TenantIsolationError, TenantSession
from shared.tenancy import tenant_scope

from .conftest import as_tenant
from .notes import Note, Setting

A, B = "t_alpha", "t_bravo"


async def _seed(db: Database) -> None:
    with tenant_scope(as_tenant(A)):
        async with db.session() as s:
            s.add_all([Note(body="a1"), Note(body="a2")])
    with tenant_scope(as_tenant(B)):
        async with db.session() as s:
            s.add(Note(body="b1"))


async def _bodies(db: Database, tenant: str) -> list[str]:
    with tenant_scope(as_tenant(tenant)):
        async with db.session() as s:
            return sorted((await s.scalars(select(Note.body))).all())


NO_TENANT_STATEMENTS = {
    "select": lambda: select(Note),
    "count": lambda: select(func.count()).select_from(Note),
    "update": lambda: update(Note).values(body="x"),
    "delete": lambda: delete(Note),
    "subquery": lambda: select(Setting).where(Setting.value.in_(select(Note.body))),
}


@pytest.mark.parametrize("kind", sorted(NO_TENANT_STATEMENTS))
async def test_orm_statement_without_tenant_context_raises(db: Database, kind: str) -> None:
    """An unbound TenantSession with no tenant context refuses every statement on a tenant table."""
    await _seed(db)
    sessions = async_sessionmaker(db.engine, sync_session_class=TenantSession)
    async with sessions() as s:
        with pytest.raises(NoTenantContext):
            await s.execute(NO_TENANT_STATEMENTS[kind]())
    assert await _bodies(db, A) == ["a1", "a2"]


@pytest.mark.parametrize("kind", sorted(NO_TENANT_STATEMENTS))
async def test_system_session_cannot_touch_tenant_tables(db: Database, kind: str) -> None:
    """The platform session fails closed on tenant tables, even inside a tenant's context."""
    await _seed(db)
    with tenant_scope(as_tenant(A)):
        with pytest.raises(NoTenantContext):
            async with db.system_session() as s:
                await s.execute(NO_TENANT_STATEMENTS[kind]())
    assert await _bodies(db, B) == ["b1"]


async def test_session_needs_a_tenant_context(db: Database) -> None:
    """db.session() itself refuses to open without a tenant."""
    with pytest.raises(NoTenantContext):
        async with db.session():
            pass


async def test_system_session_reads_and_writes_platform_tables(db: Database) -> None:
    """Platform (non-tenant) tables work in the system session and are shared by all tenants."""
    async with db.system_session() as s:
        s.add(Setting(key="motd", value="hello"))
    with tenant_scope(as_tenant(B)):
        async with db.session() as s:
            assert (await s.get(Setting, "motd")).value == "hello"


async def test_each_tenant_sees_only_its_own_rows(db: Database) -> None:
    """Selects, counts and get() by primary key are confined to the session's tenant."""
    await _seed(db)
    assert await _bodies(db, A) == ["a1", "a2"]
    assert await _bodies(db, B) == ["b1"]
    with tenant_scope(as_tenant(B)):
        async with db.session() as s:
            b_ids = [n.id for n in (await s.scalars(select(Note))).all()]
            assert await s.scalar(select(func.count()).select_from(Note)) == 1
    with tenant_scope(as_tenant(A)):
        async with db.session() as s:
            mine = (await s.scalars(select(Note.id))).all()
            assert [await s.get(Note, i) for i in b_ids] == [None]
            assert len(mine) == 2 and not set(mine) & set(b_ids)


async def test_inserts_are_stamped_with_the_tenant(db: Database) -> None:
    """add() and insert() rows get the session's tenant_id without the caller naming it."""
    with tenant_scope(as_tenant(A)):
        async with db.session() as s:
            note = Note(body="added")
            s.add(note)
            await s.flush()
            assert note.tenant_id == A
            await s.execute(insert(Note), [{"body": "bulk1"}, {"body": "bulk2"}])
            await s.execute(insert(Note).values(body="inline"))
            await s.execute(insert(Note.__table__), [{"body": "core"}])
    async with db.engine.connect() as conn:
        if db.dialect == "postgresql":
            await conn.execute(text("SELECT set_config('app.tenant_id', :t, true)"), {"t": A})
        rows = (await conn.execute(text("SELECT body, tenant_id FROM notes ORDER BY body"))).all()
    assert rows == [("added", A), ("bulk1", A), ("bulk2", A), ("core", A), ("inline", A)]


FOREIGN_INSERTS = {
    "add": lambda s: s.add(Note(body="evil", tenant_id=B)),
    "bulk": lambda s: s.execute(insert(Note), [{"body": "ok"}, {"body": "evil", "tenant_id": B}]),
    "values": lambda s: s.execute(insert(Note).values(body="evil", tenant_id=B)),
    "multi_values": lambda s: s.execute(insert(Note).values([{"body": "evil", "tenant_id": B}])),
    "core_bulk": lambda s: s.execute(insert(Note.__table__), [{"body": "evil", "tenant_id": B}]),
    "legacy_bulk": lambda s: s.run_sync(lambda ss: ss.bulk_insert_mappings(Note, [{"body": "evil"}])),
}


@pytest.mark.parametrize("kind", sorted(FOREIGN_INSERTS))
async def test_insert_for_another_tenant_is_refused(db: Database, kind: str) -> None:
    """A row naming another tenant is refused, and nothing of the transaction is written."""
    await _seed(db)
    with tenant_scope(as_tenant(A)):
        with pytest.raises(TenantIsolationError):
            async with db.session() as s:
                s.add(Note(body="same transaction"))
                result = FOREIGN_INSERTS[kind](s)
                if result is not None:
                    await result
                await s.flush()
    assert await _bodies(db, A) == ["a1", "a2"]
    assert await _bodies(db, B) == ["b1"]


async def test_update_and_delete_touch_only_own_rows(db: Database) -> None:
    """ORM UPDATE/DELETE with no WHERE still only reach the session's tenant."""
    await _seed(db)
    with tenant_scope(as_tenant(B)):
        async with db.session() as s:
            assert (await s.execute(update(Note).values(body="defaced"))).rowcount == 1
            assert (await s.execute(delete(Note).where(Note.body == "a1"))).rowcount == 0
    with tenant_scope(as_tenant(A)):
        async with db.session() as s:
            assert (await s.execute(delete(Note).where(Note.body == "a1"))).rowcount == 1
    assert await _bodies(db, A) == ["a2"]
    assert await _bodies(db, B) == ["defaced"]


async def test_bulk_update_by_primary_key_is_refused(db: Database) -> None:
    """Bulk UPDATE by primary key ignores loader criteria, so the session refuses it."""
    await _seed(db)
    with tenant_scope(as_tenant(A)):
        async with db.session() as s:
            a_id = (await s.scalars(select(Note.id))).first()
    with tenant_scope(as_tenant(B)):
        with pytest.raises(TenantIsolationError):
            async with db.session() as s:
                await s.execute(update(Note), [{"id": a_id, "body": "hijacked"}])
    assert await _bodies(db, A) == ["a1", "a2"]


async def test_moving_a_row_to_another_tenant_is_refused(db: Database) -> None:
    """Changing tenant_id on a loaded object fails at flush; the row stays put."""
    await _seed(db)
    with tenant_scope(as_tenant(A)):
        with pytest.raises(TenantIsolationError):
            async with db.session() as s:
                note = (await s.scalars(select(Note).where(Note.body == "a1"))).one()
                note.tenant_id = B
    assert await _bodies(db, B) == ["b1"]


async def test_core_statement_on_tenant_table_is_refused(db: Database) -> None:
    """A Core select on the table (no ORM entity, so no filter) is refused, not run unfiltered."""
    await _seed(db)
    with tenant_scope(as_tenant(A)):
        with pytest.raises(TenantIsolationError):
            async with db.session() as s:
                await s.execute(select(Note.__table__))


async def test_session_cannot_cross_into_another_tenants_context(db: Database) -> None:
    """A session bound to A, used while B's context is current, refuses to run."""
    await _seed(db)
    with tenant_scope(as_tenant(A)):
        async with db.session() as s:
            with tenant_scope(as_tenant(B)):
                with pytest.raises(TenantIsolationError):
                    await s.execute(select(Note))


async def test_error_inside_session_rolls_everything_back(db: Database) -> None:
    """An exception in the block leaves no half-written rows."""
    with tenant_scope(as_tenant(A)):
        with pytest.raises(RuntimeError):
            async with db.session() as s:
                s.add(Note(body="half"))
                await s.flush()
                raise RuntimeError("boom")
    assert await _bodies(db, A) == []


async def test_commit_inside_session_keeps_the_tenant(db: Database) -> None:
    """After an explicit commit the next transaction is still confined (and RLS-bound) to the tenant."""
    await _seed(db)
    with tenant_scope(as_tenant(A)):
        async with db.session() as s:
            s.add(Note(body="a3"))
            await s.commit()
            assert sorted((await s.scalars(select(Note.body))).all()) == ["a1", "a2", "a3"]


def _dialect_insert(db: Database):
    if db.dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    return dialect_insert


async def test_upsert_must_be_keyed_by_tenant(db: Database) -> None:
    """ON CONFLICT DO UPDATE could hit another tenant's row unless tenant_id is in the conflict target."""
    await _seed(db)
    upsert = _dialect_insert(db)
    with tenant_scope(as_tenant(A)):
        async with db.session() as s:
            a_id = (await s.scalars(select(Note.id).where(Note.body == "a1"))).one()
    with tenant_scope(as_tenant(B)):
        async with db.session() as s:
            stmt = upsert(Note).values(id=a_id, body="b-dup").on_conflict_do_nothing(index_elements=["id"])
            await s.execute(stmt)
        for bad in (
            upsert(Note)
            .values(id=a_id, body="hijack")
            .on_conflict_do_update(index_elements=["id"], set_={"body": "hijack"}),
            upsert(Note)
            .values(id=a_id, body="move")
            .on_conflict_do_update(index_elements=["id", "tenant_id"], set_={"tenant_id": A}),
        ):
            with pytest.raises(TenantIsolationError):
                async with db.session() as s:
                    await s.execute(bad)
    assert await _bodies(db, A) == ["a1", "a2"]
    assert await _bodies(db, B) == ["b1"]


def _detached(obj):
    make_transient_to_detached(obj)  # as if loaded earlier: add() attaches it without a SELECT
    return obj


async def test_objects_attached_without_loading_are_still_confined(db: Database) -> None:
    """A lazy load from an attached platform row, or a refresh of an attached foreign key, stays in the tenant."""
    await _seed(db)
    async with db.system_session() as s:
        s.add(Setting(key="k", value="b1"))
    with tenant_scope(as_tenant(B)):
        async with db.session() as s:
            b_id = (await s.scalars(select(Note.id))).one()
    with tenant_scope(as_tenant(A)):
        async with db.session() as s:
            setting, ghost = _detached(Setting(key="k", value="b1")), _detached(Note(id=b_id))
            s.add_all([setting, ghost])
            assert await s.run_sync(lambda _: [n.body for n in setting.notes]) == []
            with pytest.raises(ObjectDeletedError):
                await s.run_sync(lambda _: ghost.body)


async def test_attached_object_claiming_our_tenant_cannot_change_a_foreign_row(db: Database) -> None:
    """An object attached without loading, naming B's key but claiming A, cannot update or delete B's row."""
    await _seed(db)
    with tenant_scope(as_tenant(B)):
        async with db.session() as s:
            b_id = (await s.scalars(select(Note.id))).one()
    with tenant_scope(as_tenant(A)):
        for change in ("update", "delete"):
            with pytest.raises(TenantIsolationError):
                async with db.session() as s:
                    liar = _detached(Note(id=b_id, body="b1", tenant_id=A))
                    s.add(liar)
                    if change == "update":
                        liar.body = "overwritten"
                    else:
                        await s.delete(liar)
        async with db.session() as s:  # an attached object that really is ours may change
            own_id = (await s.scalars(select(Note.id).where(Note.body == "a1"))).one()
        async with db.session() as s:
            own = _detached(Note(id=own_id, body="a1", tenant_id=A))
            s.add(own)
            own.body = "a1-edited"
    assert await _bodies(db, B) == ["b1"]
    assert await _bodies(db, A) == ["a1-edited", "a2"]
