"""Isolation proven over every RPC: the attack matrix, generated from the descriptors (issue 15)."""
from __future__ import annotations

import pytest
import pytest_asyncio

from .conftest import PRINTED
from .factories import FACTORIES
from .matrix import ATTACKS, CROSS_TENANT, run_matrix
from .methods import enumerate_rpcs, require_factories

pytestmark = pytest.mark.asyncio(loop_scope="module")

RPCS = enumerate_rpcs()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def matrix(rig):
    """Every attack on every method, once per module."""
    require_factories(RPCS, FACTORIES)
    m = await run_matrix(rig, RPCS, FACTORIES)
    PRINTED.append(m)
    return m


async def test_every_rpc_of_the_six_services_is_enumerated():
    """The descriptors name all six services, and each tenant RPC has a factory (none left over)."""
    services = {r.service for r in RPCS}
    assert services == {"identity", "credentials", "state", "inference", "orchestrator", "metering"}
    require_factories(RPCS, FACTORIES)
    assert set(FACTORIES) <= {r.path for r in RPCS}, "a factory for an RPC that no longer exists"


async def test_matrix_has_no_wrong_cell(matrix):
    """Every method answers every attack with the precise status; none differs for B's real resources."""
    assert not matrix.failures, f"{len(matrix.failures)} wrong cells:\n{matrix.report()}"


async def test_matrix_covers_every_method_and_attack(matrix):
    """No cell was skipped: each non-public method met each identity attack; each tenant method met cross-tenant."""
    for rpc in RPCS:
        if rpc.public:
            continue
        expected = {a.name for a in ATTACKS if a.applies(rpc)} | ({CROSS_TENANT} if not rpc.platform else set())
        assert {a for r, a in matrix.cells if r == rpc.path} == expected, rpc.path
