"""Declarative bases: one metadata per service, and the TenantOwned mixin every tenant table uses."""

from __future__ import annotations

from typing import Any

from sqlalchemy import MetaData, PrimaryKeyConstraint, String, Table, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, declared_attr, mapped_column, registry

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
"""Deterministic constraint names, so Alembic migrations can drop what they created."""

TENANT_COLUMN_INFO = "bulkhead_tenant_key"
"""Marker in Column.info that identifies a table's tenant column (used to spot Core statements)."""


class Base(DeclarativeBase):
    """Root of every service's models.

    A service subclasses it once in its store.py and maps its tables on that subclass::

        class StateBase(Base):
            '''The state service's tables.'''

        class Thread(StateBase, TenantOwned):
            __tablename__ = "threads"

    Each direct subclass without a table becomes an abstract root with a registry and a MetaData
    of its own, so services never share tables, class-name lookups or migrations.
    """

    metadata = MetaData(naming_convention=NAMING_CONVENTION)

    def __init_subclass__(cls, **kw: Any) -> None:
        if Base in cls.__bases__ and not _declares_table(cls):
            reg = registry(metadata=cls.__dict__.get("metadata") or MetaData(naming_convention=NAMING_CONVENTION))
            cls.registry = reg
            cls._sa_registry = reg
            cls.metadata = reg.metadata
            # Abstract: DeclarativeBase's hook then maps nothing for the service root itself.
            cls.__abstract__ = True
        super().__init_subclass__(**kw)
        table = cls.__dict__.get("__table__")
        if table is not None and is_tenant_owned(cls):
            _drop_repeated_tenant_index(table)


def _declares_table(cls: type) -> bool:
    return any(name in cls.__dict__ for name in ("__tablename__", "__table__"))


class TenantOwned:
    """Mixin for rows that belong to one tenant.

    Reads, updates and deletes through a TenantSession are filtered to the session's tenant,
    inserts are stamped with it, and on Postgres row-level security enforces the same rule.
    """

    @declared_attr
    def tenant_id(cls) -> Mapped[str]:
        """The owning tenant; set by the session, never by request data. Indexed, unless another key of the
        table leads with it (Base drops the index then: _drop_repeated_tenant_index)."""
        return mapped_column(String(64), nullable=False, index=True, info={TENANT_COLUMN_INFO: True})


def _drop_repeated_tenant_index(table: Table) -> None:
    """Leave out the mixin's index on tenant_id where a primary key, unique constraint or other index of the
    table already leads with tenant_id: it would only repeat that key (shared.db.tenant_index says what that
    costs)."""
    keys = [*table.indexes, *(c for c in table.constraints if isinstance(c, PrimaryKeyConstraint | UniqueConstraint))]
    for index in [ix for ix in table.indexes if not ix.unique and [c.name for c in ix.columns] == ["tenant_id"]]:
        if any(key is not index and [c.name for c in key.columns][:1] == ["tenant_id"] for key in keys):
            table.indexes.discard(index)
            table.c.tenant_id.index = False  # so a copy of the table (Table.to_metadata) does not make it again


def is_tenant_owned(cls: type | None) -> bool:
    """Whether a mapped class holds per-tenant rows."""
    return isinstance(cls, type) and issubclass(cls, TenantOwned)
