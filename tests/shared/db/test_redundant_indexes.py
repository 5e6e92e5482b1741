"""No service's table keeps an index that another of its keys (primary key, unique constraint or index)
already serves: a plain index whose columns begin that other key's. The usual case was the TenantOwned
mixin's index on tenant_id beside a key that leads with tenant_id (shared.db.tenant_index says what it
cost). Each service's migrations are held to its models by test_service_migrations.py."""

from __future__ import annotations

import importlib

import pytest
from sqlalchemy import Column, Index, MetaData, PrimaryKeyConstraint, String, Table, UniqueConstraint

from shared.config import SERVICES
from shared.db import Base


def _tables() -> list[Table]:
    for service in SERVICES:
        importlib.import_module(f"services.{service}.store")
    roots = [root for root in Base.__subclasses__() if root.__module__.startswith("services.")]
    return [t for root in roots for t in root.metadata.tables.values()]


def redundant_indexes(table: Table) -> list[str]:
    """Names of `table`'s plain (not unique) indexes whose columns are the first columns of another key."""
    keys = [*table.indexes, *(c for c in table.constraints if isinstance(c, PrimaryKeyConstraint | UniqueConstraint))]
    columns = {id(key): [c.name for c in key.columns] for key in keys}

    def served(index: Index) -> bool:
        mine = columns[id(index)]
        return any(other is not index and columns[id(other)][: len(mine)] == mine for other in keys)

    return [str(index.name) for index in table.indexes if not index.unique and served(index)]


def test_every_services_tables_are_found() -> None:
    """The walk reaches each service's models (else the test below would pass on nothing)."""
    names = {t.name for t in _tables()}
    assert {"state_events", "orch_steps", "metering_budget_counters", "principals"} <= names, sorted(names)


@pytest.mark.parametrize("table", _tables(), ids=lambda t: t.name)
def test_no_index_repeats_the_start_of_another_key(table: Table) -> None:
    assert redundant_indexes(table) == []


def test_an_index_a_wider_key_serves_is_reported() -> None:
    """The check itself: the mixin's index beside a primary key that leads with tenant_id, and an index on
    (tenant_id, unit) beside a unique (tenant_id, unit, period), are named; an index on unit is not."""
    table = Table(
        "counters",
        MetaData(),
        Column("tenant_id", String(64)),
        Column("unit", String(16)),
        Column("period", String(16)),
        PrimaryKeyConstraint("tenant_id", "unit"),
        UniqueConstraint("tenant_id", "unit", "period"),
        Index("ix_counters_tenant_id", "tenant_id"),
        Index("ix_counters_tenant_unit", "tenant_id", "unit"),
        Index("ix_counters_unit", "unit"),
    )
    assert sorted(redundant_indexes(table)) == ["ix_counters_tenant_id", "ix_counters_tenant_unit"]
