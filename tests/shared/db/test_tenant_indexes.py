"""No service's table keeps an index on tenant_id alone when another of its keys (primary key, unique
constraint or index) already leads with tenant_id (shared.db.tenant_index says why). Each service's
migrations are held to its models by test_service_migrations.py."""

from __future__ import annotations

import importlib

import pytest
from sqlalchemy import Index, PrimaryKeyConstraint, Table, UniqueConstraint

from shared.config import SERVICES
from shared.db import Base


def _tables() -> list[Table]:
    for service in SERVICES:
        importlib.import_module(f"services.{service}.store")
    roots = [root for root in Base.__subclasses__() if root.__module__.startswith("services.")]
    return [t for root in roots for t in root.metadata.tables.values()]


def redundant_tenant_indexes(table: Table) -> list[str]:
    """Names of `table`'s indexes on tenant_id alone that another key leading with tenant_id (or on it alone,
    as a unique constraint) repeats."""
    keys = [*table.indexes, *(c for c in table.constraints if isinstance(c, PrimaryKeyConstraint | UniqueConstraint))]
    columns = {id(key): [c.name for c in key.columns] for key in keys}
    alone = [k for k in table.indexes if columns[id(k)] == ["tenant_id"]]
    return [str(k.name) for k in alone if any(o is not k and columns[id(o)][:1] == ["tenant_id"] for o in keys)]


def test_every_services_tables_are_found() -> None:
    """The walk reaches each service's models (else the test below would pass on nothing)."""
    names = {t.name for t in _tables()}
    assert {"state_events", "orch_steps", "metering_budget_counters", "principals"} <= names, sorted(names)


@pytest.mark.parametrize("table", _tables(), ids=lambda t: t.name)
def test_no_tenant_index_repeats_a_wider_key(table: Table) -> None:
    assert redundant_tenant_indexes(table) == []


def test_a_repeated_tenant_index_is_reported() -> None:
    """The check itself: the mixin's index beside a primary key that leads with tenant_id is named."""
    from sqlalchemy import Column, MetaData, String

    table = Table(
        "counters",
        MetaData(),
        Column("tenant_id", String(64)),
        Column("unit", String(16)),
        PrimaryKeyConstraint("tenant_id", "unit"),
        Index("ix_counters_tenant_id", "tenant_id"),
    )
    assert redundant_tenant_indexes(table) == ["ix_counters_tenant_id"]
