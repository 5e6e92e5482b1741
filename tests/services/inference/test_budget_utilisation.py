"""Budget utilisation across replicas: a call is refused only when the budget is really spoken for."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from bulkhead.inference.v1 import inference_pb2 as pb
from services.inference import wire
from services.inference.budget import BudgetRefused
from shared.errors import error_details
from testkit.fake_anthropic import Reply

from .helpers import PINNED, fake_totals, params

BUDGET = 8000


def _reservation(p: pb.MessageParams) -> int:
    body = wire.params_to_json(p, model=PINNED, max_tokens=p.max_tokens)
    return wire.estimate_input_tokens(body) + p.max_tokens


class _Books:
    """What both replicas have spent or hold, seen from outside the leases' own refusal logic."""

    def __init__(self, replicas):
        self.returned = 0
        self.refusals: list[tuple[int, int, int]] = []
        """(used, in flight, needed) at each refusal, in order."""
        self._budgets = [r.service.budget for r in replicas]
        for budget in self._budgets:
            self._watch(budget)

    def _watch(self, budget) -> None:
        backend, hold = budget._backend, budget.hold
        release = backend.release

        async def counted_release(lease_id, spent):
            await release(lease_id, spent)
            self.returned += spent.total  # charged at metering; the lease leaves memory right after

        async def watched_hold(ctx, model, amount):
            try:
                return await hold(ctx, model, amount)
            except BudgetRefused:
                self.refusals.append((*self.snapshot(), amount))
                raise

        backend.release = counted_release
        budget.hold = watched_hold

    def snapshot(self) -> tuple[int, int]:
        """(used, in flight): spend of returned and open leases, and what calls in flight hold."""
        leases = [lease for b in self._budgets for ls in b._leases.values() for lease in ls]
        return self.returned + sum(lease.spent.total for lease in leases), sum(lease.held for lease in leases)


@pytest.mark.slow
@pytest.mark.parametrize("slice_tokens", [20000, 2000])
async def test_200_concurrent_calls_on_two_replicas_are_refused_only_past_95_percent(mesh, slice_tokens):
    """200 calls at once over 2 replicas against a hard budget: the first refusal comes only when
    used + in-flight reservations exceed 95 % of the budget, it carries the figures, and nothing overspends."""
    # The default slice (more than the whole budget: one replica's lease takes it all) and a small one.
    mesh.env_overrides["BULKHEAD_INFERENCE_LEASE_TOKENS"] = str(slice_tokens)
    await mesh.stop_proxy(mesh.proxies[0])
    await mesh.start_proxy()
    await mesh.start_proxy()
    p = params(max_tokens=100)
    cost = _reservation(p)
    used_per_call = cost - p.max_tokens + 40  # replies use 40 of the 100 output tokens reserved
    mesh.fake.script(*[Reply.text("x", usage={"input_tokens": cost - p.max_tokens, "output_tokens": 40})] * 200)
    mesh.fake.delay = 0.05
    await mesh.set_budget("t_a", BUDGET)
    books = _Books(mesh.proxies)

    async def one(i: int) -> tuple[str, dict | None]:
        try:
            await mesh.proxies[i % 2].stub.CreateMessage(pb.CreateMessageRequest(params=p), metadata=mesh.md("t_a"))
            return "ok", None
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
            return "refused", error_details(exc)

    started = time.perf_counter()
    outcomes = await asyncio.gather(*(one(i) for i in range(200)))
    elapsed = time.perf_counter() - started
    await mesh.settle()
    for proxy in mesh.proxies:
        await proxy.service.budget.close()  # leases back: metering's used is then the whole spend
    served = sum(1 for o, _ in outcomes if o == "ok")
    calls, fake_in, fake_out = fake_totals(mesh.fake, mesh.proxy.proxy.opaque_user_id("t_a"))
    assert calls == served and fake_in + fake_out == served * used_per_call <= BUDGET
    status = await mesh.budget_status("t_a")
    assert status.used == fake_in + fake_out and status.used + status.held <= BUDGET

    assert books.refusals, "the burst asks for more than the budget: some call must be refused"
    used, in_flight, needed = books.refusals[0]
    utilisation = (used + in_flight) / BUDGET
    print(
        f"\n[slice {slice_tokens}] utilisation at first refusal: {utilisation:.1%} "
        f"(used {used} + in flight {in_flight} of {BUDGET}, the refused call needed {needed}); "
        f"served {served}/200, spent {status.used} ({status.used / BUDGET:.0%}) "
        f"in {elapsed:.2f}s"
    )
    assert utilisation > 0.95
    # Every refusal, not only the first: the call really did not fit.
    assert [r for r in books.refusals if sum(r) <= BUDGET] == []
    refusal = next(d for o, d in outcomes if o == "refused")
    assert refusal["reason"] == "BUDGET_EXHAUSTED"
    quota = dict(refusal["quota"])
    assert f"limit {BUDGET}" in quota["budget:tokens"] and "used" in quota["budget:tokens"]
    assert "calls in flight" in quota["budget:replica"]
