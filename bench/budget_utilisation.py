"""Budget utilisation at the first refusal: N concurrent calls over 2 proxy replicas against a hard budget.

    .venv/bin/python bench/budget_utilisation.py [calls] [--budget TOKENS] [--slice TOKENS] [--json FILE]

Metering, credentials, the fake upstream (50 ms per reply) and two proxy replicas in this process
(the inference tests' mesh). Each reply uses 40 of the 100 output tokens reserved. Printed: what the
replicas had spent plus what calls in flight held when the first call was refused, as a share of the
budget (issue 19's target: above 95 %), and the share of the budget spent in the end.
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import grpc

from bench._figures import add_json_option, write_json
from bulkhead.inference.v1 import inference_pb2 as pb
from services.inference import wire
from services.inference.budget import BudgetRefused
from testkit.fake_anthropic import Reply
from tests.services.inference.helpers import PINNED, params, start_mesh, stop_mesh


def _watch(budgets: list, refusals: list, returned: list) -> None:
    """Record (used, in flight, needed) across all replicas at every refusal."""

    def snapshot() -> tuple[int, int]:
        leases = [lease for b in budgets for ls in b._leases.values() for lease in ls]
        return returned[0] + sum(lease.spent.total for lease in leases), sum(lease.held for lease in leases)

    for budget in budgets:
        backend, hold = budget._backend, budget.hold
        release = backend.release

        async def counted_release(lease_id, spent, release=release):
            await release(lease_id, spent)
            returned[0] += spent.total

        async def watched_hold(ctx, model, amount, hold=hold):
            try:
                return await hold(ctx, model, amount)
            except BudgetRefused:
                refusals.append((*snapshot(), amount))
                raise

        backend.release = counted_release
        budget.hold = watched_hold


async def main(calls: int, budget: int, slice_tokens: int, json_to: str | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        mesh = await start_mesh(pathlib.Path(tmp), proxies=0)
        mesh.env_overrides["BULKHEAD_INFERENCE_LEASE_TOKENS"] = str(slice_tokens)
        try:
            for _ in range(2):
                await mesh.start_proxy()
            p = params(max_tokens=100)
            body = wire.params_to_json(p, model=PINNED, max_tokens=p.max_tokens)
            input_tokens = wire.estimate_input_tokens(body)
            mesh.fake.script(*[Reply.text("x", usage={"input_tokens": input_tokens, "output_tokens": 40})] * calls)
            mesh.fake.delay = 0.05
            await mesh.set_budget("t_a", budget)
            refusals: list = []
            _watch([proxy.service.budget for proxy in mesh.proxies], refusals, [0])

            async def one(i: int) -> bool:
                try:
                    await mesh.proxies[i % 2].stub.CreateMessage(
                        pb.CreateMessageRequest(params=p), metadata=mesh.md("t_a")
                    )
                    return True
                except grpc.aio.AioRpcError:
                    return False

            started = time.perf_counter()
            served = sum(await asyncio.gather(*(one(i) for i in range(calls))))
            elapsed = time.perf_counter() - started
            await mesh.settle()
            for proxy in mesh.proxies:
                await proxy.service.budget.close()
            spent = (await mesh.budget_status("t_a")).used
        finally:
            await stop_mesh(mesh)
    first = refusals[0] if refusals else None
    utilisation = (first[0] + first[1]) / budget if first else None
    if first:
        print(
            f"budget utilisation at first refusal: {utilisation:.1%} (used {first[0]} + in flight {first[1]} "
            f"of {budget}; the refused call needed {first[2]})"
        )
    else:
        print("no call was refused")
    print(
        f"{served}/{calls} calls served in {elapsed:.2f}s, {spent} tokens spent ({spent / budget:.1%} of the budget); "
        f"lease slice {slice_tokens}, 2 replicas"
    )
    write_json(json_to, {"utilisation_at_first_refusal": utilisation, "served": served, "spent_share": spent / budget})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("calls", type=int, nargs="?", default=200)
    parser.add_argument("--budget", type=int, default=8000)
    parser.add_argument("--slice", type=int, default=20000, help="tokens a replica leases at a time")
    add_json_option(parser)
    cli = parser.parse_args()
    asyncio.run(main(cli.calls, cli.budget, cli.slice, cli.json))
