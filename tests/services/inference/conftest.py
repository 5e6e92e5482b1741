"""Fixtures for the inference tests: the whole mesh with real servers on port 0."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.inference.server import MIGRATIONS
from shared.db import Database

from .helpers import Mesh, make_templates, start_mesh, stop_mesh


@pytest.fixture(scope="session")
def db_templates(tmp_path_factory) -> Path:
    """Migrated empty databases, made once per session."""
    return make_templates(tmp_path_factory.mktemp("inference-templates"))


@pytest.fixture
async def mesh(tmp_path, db_templates) -> AsyncIterator[Mesh]:
    """Fake upstream, metering, credentials and one proxy replica."""
    m = await start_mesh(tmp_path, templates=db_templates)
    try:
        yield m
    finally:
        await stop_mesh(m)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def journal_db(request, tmp_path) -> AsyncIterator[Database]:
    """The attempt journal's database on both dialects (Postgres as the runtime role, past its stricter typing)."""
    if request.param == "sqlite":
        db = await Database.open(f"sqlite+aiosqlite:///{tmp_path / 'journal.db'}", migrations=str(MIGRATIONS))
    else:
        urls = await request.getfixturevalue("postgres").create_database(f"journal_{uuid.uuid4().hex[:8]}")
        db = await Database.open(urls.app_url, migrations=str(MIGRATIONS), owner_url=urls.owner_url)
    yield db
    await db.close()
