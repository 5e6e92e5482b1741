"""Metering worker processes (BULKHEAD_METERING_WORKERS): one port shared only when asked for, every worker
serves, and budgets stay exact and idempotent when holds are placed and settled by different workers."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator

import grpc
import pytest
from prometheus_client import CollectorRegistry

from bulkhead.metering.v1 import metering_pb2 as pb
from bulkhead.metering.v1 import metering_pb2_grpc
from services.metering.config import MeteringConfig
from services.metering.server import MIGRATIONS, MeteringService, serve_metering
from services.metering.workers import WORKER_ENV
from shared.client import make_channel
from shared.config import ConfigError
from shared.db import Database
from shared.errors import error_details
from testkit.tokens import TestTokens

from .helpers import OPERATOR, FakeClock, price_and_budget

A = "t_alpha"
MODEL = "claude-test"
BUDGET = 10_000


class Workers:
    """Two metering servers over one Postgres database, as two worker processes are (own pools, own caches)."""

    def __init__(self, tokens: TestTokens, services: list[MeteringService]) -> None:
        self.tokens, self.services = tokens, services

    def md(self, tenant_id: str, scopes=("*",), tier: str = "pooled") -> tuple[tuple[str, str], ...]:
        return self.tokens.metadata(tenant_id, scopes, tier=tier)

    def op(self) -> tuple[tuple[str, str], ...]:
        return self.tokens.metadata(OPERATOR, ("platform.operator",), principal_id="p_operator")


async def _workers(postgres, *, shared_port: bool) -> AsyncIterator[Workers]:
    urls = await postgres.create_database("metering_workers")
    tokens, clock = TestTokens(), FakeClock()
    services: list[MeteringService] = []
    try:
        address = "127.0.0.1:0"
        for _ in range(2):
            # Each with the migrations, as every worker starts: at head already for the second, and what builds a
            # bridge or silo tenant's tables on whichever worker first serves it.
            db = await Database.open(urls.app_url, migrations=str(MIGRATIONS), owner_url=urls.owner_url, pool_size=5)
            services.append(
                await serve_metering(
                    db=db,
                    verifier=tokens.verifier,
                    clock=clock,
                    registry=CollectorRegistry(),
                    price_cache_s=0,
                    address=address,
                    reuse_port=shared_port,
                )
            )
            if shared_port:
                address = services[0].running.address
        yield Workers(tokens, services)
    finally:
        for service in reversed(services):
            await service.stop(grace=0)


@pytest.fixture
async def two_workers(postgres) -> AsyncIterator[Workers]:
    """Two servers on their own ports: each call goes to the worker the test chooses."""
    async for workers in _workers(postgres, shared_port=False):
        yield workers


@pytest.fixture
async def shared_port_workers(postgres) -> AsyncIterator[Workers]:
    """Two servers sharing one port (SO_REUSEPORT): the kernel chooses per connection."""
    async for workers in _workers(postgres, shared_port=True):
        yield workers


async def test_two_workers_share_a_port_and_both_serve(shared_port_workers):
    """With reuse_port both servers bind one port; calls over many connections reach each of them."""
    first, second = shared_port_workers.services
    assert first.running.port == second.running.port
    channels = [
        grpc.aio.insecure_channel(first.running.address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(16)
    ]
    try:
        for i, channel in enumerate(channels):
            await metering_pb2_grpc.MeteringServiceStub(channel).ReserveBudget(
                pb.ReserveBudgetRequest(model=MODEL, prompt_tokens=1, max_output_tokens=1),
                metadata=shared_port_workers.md(f"t_conn{i}"),
            )
    finally:
        for channel in channels:
            await channel.close()
    served = [len(s.usage._noted) for s in (first, second)]  # each worker notes the tenants it served
    assert sum(served) == 16 and all(served), served


async def test_a_single_server_refuses_a_port_in_use(two_workers):
    """Without reuse_port (one worker, the default) gRPC still refuses a port another server holds."""
    first = two_workers.services[0]
    with pytest.raises((OSError, RuntimeError)):
        await serve_metering(
            db=first.db,
            verifier=two_workers.tokens.verifier,
            address=first.running.address,
            registry=CollectorRegistry(),
        )


@pytest.mark.parametrize("tier", ["pooled", "bridge", "silo"])
async def test_holds_placed_and_settled_across_workers_never_overspend(two_workers, tier):
    """400 concurrent pairs, each reserved on one worker and committed on the other, against a hard token
    budget: used <= budget and == the sum committed, nothing left held; a keyed reservation retried on both
    workers holds once; a commit retried on the other worker charges once."""
    w = two_workers
    channels = [make_channel(s.running.address) for s in w.services]
    stubs = [metering_pb2_grpc.MeteringServiceStub(c) for c in channels]
    md = w.md(A, scopes=("metering.budget.write",), tier=tier)
    try:
        # A first call makes the tenant's tier known (its budget then lives where its tier keeps its rows).
        first = await stubs[0].ReserveBudget(pb.ReserveBudgetRequest(model=MODEL, prompt_tokens=1), metadata=md)
        await stubs[0].ReleaseBudget(pb.ReleaseBudgetRequest(reservation_id=first.reservation_id), metadata=md)
        await price_and_budget(stubs[0], w.op(), A, MODEL, BUDGET)
        committed: list[int] = []
        rejected: list[dict] = []

        async def pair(i: int) -> None:
            try:
                res = await stubs[i % 2].ReserveBudget(
                    pb.ReserveBudgetRequest(model=MODEL, prompt_tokens=30, max_output_tokens=70), metadata=md
                )
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
                rejected.append(error_details(err))
                return
            actual = 40 + i % 61
            commit = pb.CommitBudgetRequest(
                reservation_id=res.reservation_id, usage=pb.TokenCounts(input_tokens=30, output_tokens=actual - 30)
            )
            done = await stubs[(i + 1) % 2].CommitBudget(commit, metadata=md)
            again = await stubs[i % 2].CommitBudget(commit, metadata=md)  # a retry on the other worker
            assert again.charged == done.charged and again.released == done.released
            committed.append(actual)

        await asyncio.gather(*(pair(i) for i in range(400)))
        assert committed and rejected and len(committed) + len(rejected) == 400
        assert all(r["reason"] == "BUDGET_EXHAUSTED" for r in rejected)
        status = await stubs[0].GetQuotaStatus(pb.GetQuotaStatusRequest(), metadata=w.md(A, tier=tier))
        tokens = next(b for b in status.budgets if b.budget.unit == pb.BUDGET_UNIT_TOKENS)
        assert tokens.used == sum(committed) <= BUDGET and tokens.held == 0

        # The budget is spent: release some room, then one keyed reservation retried on both workers at once.
        roomy = pb.Quota(tenant_id=A, budgets=[pb.Budget(unit=pb.BUDGET_UNIT_TOKENS, limit=10**6)])
        await stubs[0].SetQuota(pb.SetQuotaRequest(quota=roomy), metadata=w.op())
        for service in w.services:  # the other worker sees a SetQuota within budget_cache_s; the test does not wait
            service.budgets._specs.invalidate(A)
        keyed = pb.ReserveBudgetRequest(model=MODEL, prompt_tokens=10, max_output_tokens=10, idempotency_key="k-1")
        replies = await asyncio.gather(*(stubs[i % 2].ReserveBudget(keyed, metadata=md) for i in range(10)))
        assert len({r.reservation_id for r in replies}) == 1
        status = await stubs[1].GetQuotaStatus(pb.GetQuotaStatusRequest(), metadata=w.md(A, tier=tier))
        assert next(b for b in status.budgets if b.budget.unit == pb.BUDGET_UNIT_TOKENS).held == 20
    finally:
        for channel in channels:
            await channel.close()


def test_workers_must_be_a_sane_count():
    """0 or absurd worker counts are configuration errors at start; 1 is the default."""
    assert MeteringConfig.from_env({}).workers == 1
    assert MeteringConfig.from_env({"BULKHEAD_METERING_WORKERS": "4"}).workers == 4
    for bad in ("0", "65"):
        with pytest.raises(ConfigError):
            MeteringConfig.from_env({"BULKHEAD_METERING_WORKERS": bad})


def test_the_parent_never_loads_the_service():
    """`python -m services.metering` with workers > 1 imports only the config and workers.py before forking."""
    code = (
        "import sys, runpy, services.metering.workers as w\n"
        "w.serve_workers = lambda *a, **k: 0\n"
        "try:\n    runpy.run_module('services.metering', run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code == 0, e.code\n"
        "assert 'services.metering.server' not in sys.modules, 'the parent loaded the service'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != WORKER_ENV}
    env["BULKHEAD_METERING_WORKERS"] = "2"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
