"""Fixtures for orchestrator tests: the real mesh (see mesh.py), one per test module to keep CI fast.

Tests that share a mesh each create their own tenants, so nothing they do can meet.
"""

from __future__ import annotations

import pytest
import pytest_asyncio

from testkit.fake_anthropic import FakeAnthropic

from .mesh import running_mesh


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def bare_mesh(tmp_path_factory):
    """The mesh without an inference proxy and with dispatching stopped: runs stay queued."""
    async with running_mesh(tmp_path_factory.mktemp("bare"), with_inference=False) as mesh:
        await mesh.orchestrator.dispatcher.stop()
        yield mesh


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def upstream():
    """The fake Anthropic upstream."""
    async with FakeAnthropic() as fake:
        yield fake


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(tmp_path_factory, upstream):
    """The whole mesh against the fake upstream; one run per tenant at a time."""
    async with running_mesh(
        tmp_path_factory.mktemp("mesh"),
        upstream_url=upstream.base_url,
        orchestrator_env={"BULKHEAD_ORCHESTRATOR_RUNS_PER_TENANT": "1"},
    ) as m:
        yield m


@pytest.fixture(autouse=True)
def _fresh_upstream(request):
    """Each test starts with an upstream that has seen nothing and has nothing scripted."""
    if "upstream" in request.fixturenames:
        request.getfixturevalue("upstream").reset()
