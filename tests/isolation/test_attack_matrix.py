"""Isolation proven over every RPC: the attack matrix, generated from the descriptors (issue 15)."""

from __future__ import annotations

import pytest
import pytest_asyncio

from .conftest import PRINTED
from .factories import FACTORIES
from .matrix import ATTACKS, CROSS_TENANT, run_matrix
from .methods import enumerate_rpcs, require_factories
from .resources import RESOURCES

pytestmark = pytest.mark.asyncio(loop_scope="module")

RPCS = enumerate_rpcs()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def matrix(rig):
    """Every attack on every method, once per module."""
    require_factories(RPCS, FACTORIES, RESOURCES)
    m = await run_matrix(rig, RPCS, FACTORIES)
    PRINTED.append(m)
    return m


async def test_every_rpc_of_the_six_services_is_enumerated():
    """The descriptors name all six services, and each tenant RPC has a factory (none left over)."""
    services = {r.service for r in RPCS}
    assert services == {"identity", "credentials", "state", "inference", "orchestrator", "metering"}
    require_factories(RPCS, FACTORIES, RESOURCES)
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
        assert {a for r, a in matrix.cells if r == rpc.key} == expected, rpc.key


def _rpc(path: str):
    return next(r for r in RPCS if r.path == path)


GET_THREAD = "/bulkhead.state.v1.StateService/GetThread"


async def test_a_handler_without_its_tenant_check_fails_the_matrix(rig, monkeypatch):
    """GetThread made to act as whichever tenant owns the thread: the matrix names that RPC and attack."""
    from dataclasses import replace

    from bulkhead.state.v1 import state_pb2, state_pb2_grpc
    from services.state.threads import ThreadLog
    from shared.tenancy import require_tenant, tenant_scope

    fresh = f"b-fresh-{rig.b_ids.thread_id}"  # the full matrix left A a thread under B's first id
    await state_pb2_grpc.StateServiceStub(rig.channels["state"]).CreateThread(
        state_pb2.CreateThreadRequest(thread_id=fresh), metadata=rig.b.metadata
    )
    probe = replace(rig, b_ids=replace(rig.b_ids, thread_id=fresh), markers=[*rig.markers, fresh.encode()])
    honest = await run_matrix(probe, [_rpc(GET_THREAD)], FACTORIES, attacks=())
    assert not honest.failures, honest.report()

    original = ThreadLog.get

    async def leaky_get(self, thread_id):
        async with self._db.raw() as tx:  # no tenant in the WHERE: the bug under test
            owner = await tx.fetchval("SELECT tenant_id FROM state_threads WHERE thread_id = $1", thread_id)
        with tenant_scope(replace(require_tenant(), tenant_id=owner or require_tenant().tenant_id)):
            return await original(self, thread_id)

    monkeypatch.setattr(ThreadLog, "get", leaky_get)
    leaky = await run_matrix(probe, [_rpc(GET_THREAD)], FACTORIES, attacks=())
    assert [(c.rpc, c.attack) for c in leaky.failures] == [(GET_THREAD, CROSS_TENANT)]
    assert f"{GET_THREAD} × {CROSS_TENANT}: got OK" in leaky.report()
    assert "must be NOT_FOUND or PERMISSION_DENIED" in leaky.report()


async def test_repeated_identity_metadata_resolved_by_position_fails_the_matrix(rig, monkeypatch):
    """With the interceptor's old last-value-wins parsing, every duplicated-metadata cell is wrong."""
    import shared.auth

    def last_wins(md):
        return {k: v for k, v in md or () if isinstance(v, str)}, frozenset()

    monkeypatch.setattr(shared.auth, "_metadata_dict", last_wins)
    dup = tuple(a for a in ATTACKS if a.name.startswith("dup_"))
    m = await run_matrix(rig, [_rpc(GET_THREAD)], FACTORIES, attacks=dup, with_cross_tenant=False)
    wrong = {c.attack for c in m.failures}
    assert wrong == {"dup_tenant_AB", "dup_tenant_BA", "dup_auth_AB", "dup_auth_BA", "dup_request_id"}, m.report()


async def test_an_rpc_without_a_factory_fails_saying_what_to_add():
    """A new tenant-scoped RPC (a fake descriptor here) with no factory: the failure names it and the fix."""
    from .fake_rpc import widget_file
    from .methods import MissingFactory, service_files

    rpcs = enumerate_rpcs({**service_files(), "widgets": widget_file()})
    with pytest.raises(MissingFactory) as info:
        require_factories(rpcs, FACTORIES, RESOURCES)
    message = str(info.value)
    assert "/bulkhead.fake.v1.WidgetService/GetWidget (scope state.widgets.read)" in message
    assert "add FACTORIES['/bulkhead.fake.v1.WidgetService/GetWidget'] = Target(" in message
    assert "lambda i: GetWidgetRequest(<field>=i.<B's resource id>)" in message
    assert "tests/isolation/factories.py" in message
    assert "WidgetService/ListWidgets" not in message  # public: nothing to attack


async def test_a_request_naming_a_resource_nobody_makes_fails_saying_what_to_add():
    """A factory for a request naming a new resource type, with no factory making B's one: named, and the fix."""
    from .factories import Target
    from .methods import MissingFactory

    with pytest.raises(MissingFactory) as info:
        require_factories(RPCS, {**FACTORIES, GET_THREAD: Target("widget", lambda i: None)}, RESOURCES)
    assert "widget: add RESOURCES['<type>']" in str(info.value) and "tests/isolation/resources.py" in str(info.value)
