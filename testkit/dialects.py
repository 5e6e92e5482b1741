"""A test's database on each dialect: `@pytest.fixture(params=DIALECTS)` and `await open_migrated(...)`."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from shared.db import Database

DIALECTS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
"""Fixture params: SQLite, then Postgres (deselected with the postgres marker)."""


async def open_migrated(request, tmp_path: Path, migrations: str | Path, name: str) -> Database:
    """A fresh, migrated database of request.param's dialect: a SQLite file `<name>.db` under tmp_path, or a
    Postgres database `<name>_<random>` of the session's server, opened as the runtime role (not the table
    owner, so RLS and grants are real) and migrated by the owner. The caller closes it."""
    if request.param == "sqlite":
        return await Database.open(f"sqlite+aiosqlite:///{tmp_path / f'{name}.db'}", migrations=str(migrations))
    urls = await request.getfixturevalue("postgres").create_database(f"{name}_{uuid.uuid4().hex[:8]}")
    return await Database.open(urls.app_url, owner_url=urls.owner_url, migrations=str(migrations))
