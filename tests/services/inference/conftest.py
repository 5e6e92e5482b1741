"""Fixtures for the inference tests: the whole mesh with real servers on port 0."""
from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from .helpers import Mesh, start_mesh, stop_mesh


@pytest.fixture
async def mesh(tmp_path) -> AsyncIterator[Mesh]:
    """Fake upstream, metering, credentials and one proxy replica."""
    m = await start_mesh(tmp_path)
    try:
        yield m
    finally:
        await stop_mesh(m)
