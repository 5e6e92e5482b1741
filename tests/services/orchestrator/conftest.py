"""Fixtures for orchestrator tests: the real mesh (see mesh.py)."""
from __future__ import annotations

import pytest

from .mesh import running_mesh


@pytest.fixture
async def bare_mesh(tmp_path):
    """The mesh without an inference proxy: runs queue and never get a model answer."""
    async with running_mesh(tmp_path, with_inference=False) as mesh:
        yield mesh
