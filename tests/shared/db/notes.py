"""A tiny service schema for the DB layer's tests: tenant-owned notes and platform settings."""

from __future__ import annotations

from sqlalchemy import Integer, String
from sqlalchemy.orm import Mapped, mapped_column, relationship

from shared.db import Base, TenantOwned


class NotesBase(Base):
    """The test service's own tables (its own metadata)."""


class Note(NotesBase, TenantOwned):
    """A tenant's note."""

    __tablename__ = "notes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    body: Mapped[str] = mapped_column(String(200))


class Setting(NotesBase):
    """A platform-wide setting (not tenant-owned)."""

    __tablename__ = "settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(200))

    notes: Mapped[list[Note]] = relationship(Note, primaryjoin="Setting.value == foreign(Note.body)", viewonly=True)
    """Notes whose body equals this setting's value (a relationship from a platform row)."""
