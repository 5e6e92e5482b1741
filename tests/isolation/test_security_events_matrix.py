"""The matrix's cell for SecurityEventsService proves something: a ledger read that forgets the tenant fails it."""

from __future__ import annotations

import pytest

from shared.security_events import SecurityLedger

from .factories import FACTORIES
from .matrix import CROSS_TENANT, run_matrix
from .methods import enumerate_rpcs

pytestmark = pytest.mark.asyncio(loop_scope="module")

PATH = "/bulkhead.common.v1.SecurityEventsService/ListSecurityEvents"
RPCS = [r for r in enumerate_rpcs() if r.path == PATH]


async def test_every_service_serves_it_and_a_reads_none_of_bs(rig):
    """Six cells (one per service), each with B's refused calls in its ledger: A gets the same empty list."""
    assert sorted(r.service for r in RPCS) == sorted(
        ["identity", "credentials", "state", "inference", "orchestrator", "metering"]
    )
    honest = await run_matrix(rig, RPCS, FACTORIES, attacks=())
    assert len(honest.cells) == 6 and not honest.failures, honest.report()


async def test_a_ledger_read_without_its_tenant_fails_the_matrix(rig, monkeypatch):
    """ListSecurityEvents made to read whichever tenant's rows match: every service's cell names the leak."""
    original = SecurityLedger.read

    async def careless(self, tenant_id, **kw):
        rows = []
        for victim in (tenant_id, rig.b.tenant_id):  # the bug under test: rows of a tenant not the caller
            rows += await original(self, victim, **kw)
        return rows

    monkeypatch.setattr(SecurityLedger, "read", careless)
    leaky = await run_matrix(rig, RPCS, FACTORIES, attacks=())
    assert sorted(c.attack for c in leaky.failures) == [CROSS_TENANT] * 6, leaky.report()
    assert "carries B's data" in leaky.report()
