"""identity under test, on SQLite and on real Postgres (RLS, runtime role that owns no table)."""

from __future__ import annotations

import uuid

import pytest

from testkit.identity import running_identity

REGIONS = {"BULKHEAD_REGIONS": "local,eu-west"}
"""Data-residency regions the identity under test accepts (the default, local, first)."""


@pytest.fixture(params=["sqlite", "postgres"])
async def identity(request, tmp_path):
    """A running identity service and an operator session on it."""
    if request.param == "sqlite":
        async with running_identity(tmp_path, env=REGIONS) as harness:
            yield harness
        return
    postgres = request.getfixturevalue("postgres")
    urls = await postgres.create_database(f"identity_{uuid.uuid4().hex[:8]}")
    async with running_identity(tmp_path, database_url=urls.app_url, owner_url=urls.owner_url, env=REGIONS) as harness:
        yield harness


@pytest.fixture
async def sqlite_identity(tmp_path):
    """identity on SQLite only (for tests whose point is not the database)."""
    async with running_identity(tmp_path) as harness:
        yield harness
