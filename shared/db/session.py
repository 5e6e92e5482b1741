"""TenantSession: an ORM session that can only see and write one tenant's rows.

Layer 1 of data isolation (DESIGN §3). Every SELECT/UPDATE/DELETE that names a TenantOwned
class gets `tenant_id = <tenant>` added through `with_loader_criteria`; inserts are stamped
with the tenant and refused when they name another; and a statement that touches a tenant
table with no tenant to confine it to raises instead of returning everyone's rows.

Refused with TenantIsolationError, because no filter can be added to them: Core (non-ORM)
SELECT/UPDATE/DELETE on a tenant table, ORM bulk UPDATE by primary key, the legacy bulk_*
methods, INSERT ... FROM SELECT, ON CONFLICT DO UPDATE not keyed by tenant_id, and flushing
changes to an object attached without loading whose row is not this tenant's.

`text()` is not inspected. Keep raw SQL in store.py: on Postgres, row-level security (layer 2,
shared.db.rls) still confines it; on SQLite nothing does.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Iterable, Mapping
from typing import Any, cast

from sqlalchemy import event, func, inspect, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.orm import ORMExecuteState, Session, SessionTransaction, with_loader_criteria
from sqlalchemy.sql import visitors
from sqlalchemy.sql.elements import BindParameter
from sqlalchemy.sql.selectable import TableClause

from shared.db.base import TENANT_COLUMN_INFO, TenantOwned, is_tenant_owned
from shared.tenancy import NoTenantContext, current_tenant

TENANT_KEY = "bulkhead.tenant_id"
"""Session.info key: the tenant a session is bound to (set by Database.session())."""
SYSTEM_KEY = "bulkhead.system"
"""Session.info key: a platform session that may touch no tenant-owned table."""
SEARCH_PATH_KEY = "bulkhead.search_path"
"""Session.info key: the tenant's own schema (bridge tier on Postgres), made the search_path."""
PLATFORM_BIND_KEY = "bulkhead.platform_bind"
"""Session.info key: the platform (main) engine, when the tenant's rows live elsewhere (bridge, silo)."""

_TENANT_ATTR = "tenant_id"


class TenantIsolationError(RuntimeError):
    """A statement or flush would cross a tenant boundary, so it was refused."""


class TenantSession(Session):
    """A Session confined to one tenant (see the module docstring).

    The tenant is the one the session was bound to (`info[TENANT_KEY]`, set by
    `Database.session()`), else the current TenantContext. The legacy bulk methods skip both
    the execute and the flush hooks, so they are refused for tenant-owned classes.
    """

    def get_bind(self, mapper: Any = None, *, clause: Any = None, **kw: Any) -> Any:
        """The tenant's engine, except for statements and flushes that touch platform tables only.

        A bridge or silo tenant's schema, file or database holds copies of the platform tables (its
        migrations build every table), where nothing else ever looks: platform rows always go to
        the platform database. For such a tenant that is a second transaction, committed apart from
        the tenant's, so where the order of the two matters use system_session() explicitly.
        """
        platform = self.info.get(PLATFORM_BIND_KEY)
        if platform is not None and _platform_only(mapper, clause):
            return platform
        return super().get_bind(mapper, clause=clause, **kw)

    def bulk_save_objects(self, objects: Iterable[object], *args: Any, **kw: Any) -> None:
        """Session.bulk_save_objects, refused for tenant-owned objects."""
        objects = list(objects)
        if any(isinstance(o, TenantOwned) for o in objects):
            raise TenantIsolationError("bulk_save_objects bypasses tenant checks; use add_all() or insert()")
        super().bulk_save_objects(objects, *args, **kw)

    def bulk_insert_mappings(self, mapper: Any, mappings: Iterable[dict[str, Any]], *args: Any, **kw: Any) -> None:
        """Session.bulk_insert_mappings, refused for tenant-owned classes."""
        _refuse_legacy_bulk(mapper, "bulk_insert_mappings", "session.execute(insert(Model), rows)")
        super().bulk_insert_mappings(mapper, mappings, *args, **kw)

    def bulk_update_mappings(self, mapper: Any, mappings: Iterable[dict[str, Any]]) -> None:
        """Session.bulk_update_mappings, refused for tenant-owned classes."""
        _refuse_legacy_bulk(mapper, "bulk_update_mappings", "session.execute(update(Model).where(...))")
        super().bulk_update_mappings(mapper, mappings)


def _platform_only(mapper: Any, clause: Any) -> bool:
    """Whether a statement (or a flush of mapper's rows) names tables and none of them is tenant-owned."""
    tables: list[Any] = []
    info = inspect(mapper, raiseerr=False) if mapper is not None else None
    mapped = getattr(info, "mapper", None)
    if mapped is not None:
        tables.extend(mapped.tables)
    if clause is not None:
        tables.extend(e for e in visitors.iterate(clause) if isinstance(e, TableClause))
    return bool(tables) and not any(_is_tenant_table(t) for t in tables)


def _refuse_legacy_bulk(mapper: Any, method: str, instead: str) -> None:
    cls = getattr(inspect(mapper), "class_", mapper)
    if is_tenant_owned(cls):
        raise TenantIsolationError(f"{method} bypasses tenant checks; use {instead}")


def bound_tenant(session: Session) -> str | None:
    """The tenant a session acts for, or None (a system session, or no tenant context).

    Raises TenantIsolationError when the session is bound to one tenant but the running
    context is another's: a session must never be handed across tenants.
    """
    if session.info.get(SYSTEM_KEY):
        return None
    ctx = current_tenant()
    bound = session.info.get(TENANT_KEY)
    if bound is None:
        return ctx.tenant_id if ctx is not None else None
    if ctx is not None and ctx.tenant_id != bound:
        raise TenantIsolationError("a session bound to one tenant was used in another tenant's context")
    return bound


def _require_tenant(session: Session, what: str) -> str:
    tid = bound_tenant(session)
    if tid is None:
        where = "a system session" if session.info.get(SYSTEM_KEY) else "no tenant context"
        raise NoTenantContext(f"{what} touches tenant-owned rows in {where}: refused (fail closed)")
    return tid


def _tenant_tables(statement: Any) -> list[str]:
    """Names of tenant-owned tables anywhere in a statement (joins and subqueries included)."""
    found: list[str] = []
    for element in visitors.iterate(statement):
        if isinstance(element, TableClause) and _is_tenant_table(element) and element.name not in found:
            found.append(element.name)
    return found


def _is_tenant_table(table: TableClause) -> bool:
    column = table.c.get(_TENANT_ATTR) if hasattr(table, "c") else None
    return column is not None and bool(column.info.get(TENANT_COLUMN_INFO))


@functools.lru_cache(maxsize=4096)
def _criteria(tid: str) -> Any:
    # The lambda is cached per class; `tid` is read outside it, so it is tracked as a bound
    # parameter and one cached SQL string serves every tenant. Building the option costs more
    # than the query's compile-cache hit, so one option object per tenant is kept and reused.
    return with_loader_criteria(TenantOwned, lambda cls: cls.tenant_id == tid, include_aliases=True)


@event.listens_for(TenantSession, "do_orm_execute")
def _confine_statement(state: ORMExecuteState) -> None:
    """Add the tenant filter to reads/updates/deletes and stamp inserts; fail closed."""
    if not (state.is_select or state.is_insert or state.is_update or state.is_delete):
        return
    statement: Any = state.statement  # a Select, Update or Delete here: each has .where and .options
    tables = _tenant_tables(statement)
    kind = "INSERT" if state.is_insert else "UPDATE" if state.is_update else "DELETE" if state.is_delete else "SELECT"
    tid: str | None
    if tables:
        tid = _require_tenant(state.session, f"{kind} on {', '.join(tables)}")
    else:
        tid = bound_tenant(state.session)
        if tid is None:
            return  # platform tables only
    if state.is_insert:
        if tables:
            _stamp_insert(state, tid)
        return
    if not state.is_orm_statement:
        if tables:
            raise TenantIsolationError(
                f"Core {kind} on tenant-owned table {tables[0]!r} has no tenant filter; use the mapped class"
            )
        return
    if state.is_update and state.is_executemany and tables:
        # ORM "bulk UPDATE by primary key" ignores loader criteria: refuse it.
        raise TenantIsolationError("bulk UPDATE by primary key skips the tenant filter; use update(...).where(...)")
    if state.is_column_load:
        # Refreshing an expired object ignores loader criteria, and an object attached with
        # add() or merge(load=False) may name any primary key: filter it explicitly.
        for mapper in state.all_mappers:
            if is_tenant_owned(mapper.class_):
                statement = statement.where(mapper.class_.tenant_id == tid)
        state.statement = statement
        return
    # Relationship loads get the filter too: it propagates from the statement that loaded the
    # parent, but a parent attached by add() or merge() was loaded by no statement of ours.
    state.statement = statement.options(_criteria(tid))


def _stamp_insert(state: ORMExecuteState, tid: str) -> None:
    """Stamp an INSERT with the tenant; refuse one that names another tenant."""
    statement: Any = state.statement  # an Insert: its private _values are read below
    if getattr(statement, "select", None) is not None:
        raise TenantIsolationError("INSERT ... FROM SELECT into a tenant-owned table is not supported")
    post = getattr(statement, "_post_values_clause", None)
    if post is not None and hasattr(post, "update_values_to_set"):
        _check_upsert_target(post)
    inline_rows = [dict(statement._values or {})] if getattr(statement, "_values", None) else []
    inline_rows += [row for rows in (getattr(statement, "_multi_values", None) or ()) for row in rows]
    named_inline = False
    for row in inline_rows:
        for key, value in row.items() if isinstance(row, Mapping) else ():
            if getattr(key, "key", key) != _TENANT_ATTR:
                continue
            named_inline = True
            literal = value.value if isinstance(value, BindParameter) else value
            if literal != tid:
                raise TenantIsolationError("INSERT names another tenant's tenant_id: refused")
    params = state.parameters
    if isinstance(params, list):
        state.parameters = [_stamp_row(row, tid) for row in params]
    elif params:  # one row; anything else that is not a Mapping fails in _stamp_row: closed, never unstamped
        state.parameters = _stamp_row(cast("Mapping[str, Any]", params), tid)
    elif getattr(statement, "_multi_values", None):
        if not named_inline:
            raise TenantIsolationError("multi-row INSERT .values() into a tenant-owned table must name tenant_id")
    elif not named_inline:
        state.statement = statement.values({_TENANT_ATTR: tid})


def _stamp_row(row: Mapping[str, Any], tid: str) -> dict[str, Any]:
    given = row.get(_TENANT_ATTR)
    if given is not None and given != tid:
        raise TenantIsolationError("INSERT names another tenant's tenant_id: refused")
    return {**row, _TENANT_ATTR: tid}


def _check_upsert_target(clause: Any) -> None:
    # ON CONFLICT DO UPDATE may hit an existing row; only a conflict target that includes
    # tenant_id guarantees that row is this tenant's own.
    targets = getattr(clause, "inferred_target_elements", None) or ()
    names = {getattr(t, "key", None) or getattr(t, "name", None) or str(t) for t in targets}
    if _TENANT_ATTR not in names:
        raise TenantIsolationError("ON CONFLICT DO UPDATE on a tenant-owned table needs tenant_id in index_elements")
    to_set = clause.update_values_to_set  # a dict on SQLAlchemy 2.1, (key, value) pairs on 2.0
    keys = to_set.keys() if isinstance(to_set, Mapping) else [key for key, _ in to_set]
    if any(getattr(key, "key", key) == _TENANT_ATTR for key in keys):
        raise TenantIsolationError("ON CONFLICT DO UPDATE cannot set tenant_id: rows never move tenants")


_TRUSTED_KEY = "bulkhead.trusted"
"""Session.info key: tenant-owned objects this session loaded through its filter or inserted."""


@event.listens_for(TenantSession, "loaded_as_persistent")
@event.listens_for(TenantSession, "pending_to_persistent")
def _trust(session: Session, instance: object) -> None:
    """Remember objects whose row is known to be this tenant's (loaded filtered, or inserted here)."""
    if isinstance(instance, TenantOwned):
        session.info.setdefault(_TRUSTED_KEY, weakref.WeakSet()).add(instance)


@event.listens_for(TenantSession, "before_flush")
def _stamp_flush(session: Session, flush_context: Any, instances: Any) -> None:
    """Stamp new tenant-owned objects; refuse any that belong to, or move to, another tenant."""
    new = [o for o in session.new if isinstance(o, TenantOwned)]
    changed = [o for o in (*session.dirty, *session.deleted) if isinstance(o, TenantOwned)]
    if not (new or changed):
        return
    tid = _require_tenant(session, "flush")
    for obj in new:
        if obj.tenant_id is None:
            obj.tenant_id = tid
        elif obj.tenant_id != tid:
            raise TenantIsolationError(f"{type(obj).__name__} for another tenant cannot be added: refused")
    trusted = session.info.get(_TRUSTED_KEY) or ()
    for obj in changed:
        if inspect(obj).attrs.tenant_id.history.has_changes():
            raise TenantIsolationError(f"{type(obj).__name__}.tenant_id cannot change: rows never move tenants")
        if obj.tenant_id != tid:
            raise TenantIsolationError(f"{type(obj).__name__} of another tenant cannot be changed: refused")
        # The unit of work updates and deletes by primary key alone. An object attached with
        # add() or merge(load=False) may carry any key (and claim any tenant_id): check the row.
        if obj not in trusted and not _row_is_tenants(session, obj):
            raise TenantIsolationError(f"{type(obj).__name__} is not a row of this tenant: refused")


def _row_is_tenants(session: Session, obj: object) -> bool:
    mapper = inspect(obj).mapper
    identity = inspect(obj).identity or ()
    match = [column == value for column, value in zip(mapper.primary_key, identity, strict=True)]
    # Runs through do_orm_execute, so the tenant filter is applied.
    return bool(session.execute(select(func.count()).select_from(mapper.class_).where(*match)).scalar())


_SET_TENANT = text("SELECT set_config('app.tenant_id', :tid, true)")
_SET_TENANT_AND_SCHEMA = text("SELECT set_config('app.tenant_id', :tid, true), set_config('search_path', :sp, true)")


@event.listens_for(TenantSession, "after_begin")
def _bind_transaction(session: Session, transaction: SessionTransaction, connection: Connection) -> None:
    """On Postgres, tell RLS whose transaction this is; local to it, so pooled connections forget."""
    if connection.dialect.name != "postgresql":
        return
    tid = session.info.get(TENANT_KEY)
    if tid is None:
        return
    schema = session.info.get(SEARCH_PATH_KEY)
    # A bridge tenant's schema would shadow the platform tables on the platform connection.
    if schema and connection.engine is not session.info.get(PLATFORM_BIND_KEY):
        connection.execute(_SET_TENANT_AND_SCHEMA, {"tid": tid, "sp": schema})
    else:
        connection.execute(_SET_TENANT, {"tid": tid})
