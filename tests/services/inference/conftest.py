"""Fixtures for the inference tests: the whole mesh with real servers on port 0."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.inference.server import MIGRATIONS
from shared.db import Database
from testkit.dialects import DIALECTS, open_migrated

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


@pytest.fixture(params=DIALECTS)
async def journal_db(request, tmp_path) -> AsyncIterator[Database]:
    """The attempt journal's database on both dialects (Postgres as the runtime role, past its stricter typing)."""
    db = await open_migrated(request, tmp_path, MIGRATIONS, "journal")
    yield db
    await db.close()
