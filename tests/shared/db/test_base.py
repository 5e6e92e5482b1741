"""Declarative bases: one metadata per service; TenantOwned's column."""

from __future__ import annotations

from sqlalchemy import Integer, MetaData, PrimaryKeyConstraint, String
from sqlalchemy.orm import Mapped, mapped_column

from shared.db import Base, TenantOwned, is_tenant_owned
from shared.db.base import TENANT_COLUMN_INFO

from .notes import Note, NotesBase, Setting


def test_each_service_base_has_its_own_metadata_and_registry() -> None:
    """Two services may both map a `notes` table without sharing metadata, registry or Base's."""

    class OtherBase(Base):
        """Another service's tables."""

    class OtherNote(OtherBase, TenantOwned):
        __tablename__ = "notes"
        id: Mapped[int] = mapped_column(Integer, primary_key=True)

    assert OtherBase.metadata is not NotesBase.metadata
    assert OtherBase.registry is not NotesBase.registry
    assert set(NotesBase.metadata.tables) == {"notes", "settings"}
    assert set(OtherBase.metadata.tables) == {"notes"}
    assert OtherNote.__table__ is not Note.__table__
    assert not Base.metadata.tables


def test_tenant_owned_adds_an_indexed_not_null_tenant_column() -> None:
    """tenant_id is String(64), NOT NULL and indexed with a conventional name."""
    column = Note.__table__.c.tenant_id
    assert isinstance(column.type, String) and column.type.length == 64
    assert column.nullable is False
    assert [ix.name for ix in Note.__table__.indexes if "tenant_id" in ix.columns] == ["ix_notes_tenant_id"]
    assert is_tenant_owned(Note) and not is_tenant_owned(Setting)
    assert "tenant_id" not in Setting.__table__.c


def test_tenant_owned_leaves_out_its_index_where_another_key_leads_with_tenant_id() -> None:
    """A primary key that leads with tenant_id serves the mixin's look-ups: no second index, and the column
    keeps the marker by which sessions and Core statements are scoped to the tenant."""

    class KeyedBase(Base):
        """A service whose table's primary key leads with tenant_id."""

    class Counter(KeyedBase, TenantOwned):
        __tablename__ = "counters"
        __table_args__ = (PrimaryKeyConstraint("tenant_id", "unit"),)
        unit: Mapped[str] = mapped_column(String(16))

    column = Counter.__table__.c.tenant_id
    assert isinstance(column.type, String) and column.type.length == 64 and column.nullable is False
    assert column.info == Note.__table__.c.tenant_id.info == {TENANT_COLUMN_INFO: True}
    assert not Counter.__table__.indexes
    assert not Counter.__table__.to_metadata(MetaData()).indexes  # nor does a copy make it again
    assert [c.name for c in Counter.__table__.primary_key.columns] == ["tenant_id", "unit"]
