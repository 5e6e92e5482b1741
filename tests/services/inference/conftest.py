"""Fixtures for the inference tests: the whole mesh with real servers on port 0."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

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
