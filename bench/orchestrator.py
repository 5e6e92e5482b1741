#!/usr/bin/env python3
"""Orchestrator overhead and fairness, on the real mesh in one process against an instant fake upstream.

One run = 3 model calls (two of them ask for read_context, so 2 tool steps) = 7 recorded steps
(start, 3 model, 2 tool, finish). In the same process and against the same servers it measures:

  direct   the calls such a run makes, made straight from a client: CreateThread, 7 AppendEvents,
           3 CreateMessage (proxy), 2 GetContext (state)
  orch     the same run through the orchestrator: StartRun, then WatchRun until it ends

and prints per-run latency (median, sequential), the overhead per step, and runs/s for many
concurrent runs across tenants with each tenant's median step wait (the fairness figure). The
concurrent runs go in `--rounds` rounds (3), each the direct calls and the orchestrated runs in
turns, whichever went second going first next; the figure is the median of the rounds' ratios.
The mesh's start-up heap is frozen first, as each service freezes its own once it listens.

The overhead per step compares like with like: an orchestrated run's first to last step timestamp
(a step is stamped before its append, so this spans CreateThread, appends 1..6 and the 5 calls)
against the direct run's same calls. (Until issue 16 the direct side started after its first append,
so CreateThread and one append counted as orchestrator overhead, about 1 ms per step.)

    python bench/orchestrator.py              # < 60 s
    python bench/orchestrator.py --quick      # a few seconds
    python bench/orchestrator.py --postgres   # the orchestrator's and state's databases on Postgres
                                              # (started for the run as the tests do; SQLite otherwise)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from bench._figures import add_json_option, write_json  # noqa: E402
from bulkhead.inference.v1 import inference_pb2, inference_pb2_grpc  # noqa: E402
from bulkhead.orchestrator.v1 import orchestrator_pb2 as pb  # noqa: E402
from bulkhead.state.v1 import state_pb2, state_pb2_grpc  # noqa: E402
from services.orchestrator.steps import STEP_EVENT_TYPE  # noqa: E402
from shared.process import freeze_startup_heap  # noqa: E402
from testkit.fake_anthropic import FakeAnthropic  # noqa: E402
from tests.services.orchestrator.mesh import running_mesh  # noqa: E402

MODEL = "claude-sonnet-4-5"
STEPS_PER_RUN = 7


class ThreeStepUpstream(FakeAnthropic):
    """Instant replies that ask for read_context twice, then answer: the same for every run, at any concurrency."""

    def _build_message(self, body: dict[str, Any], api_key: str | None = None) -> dict[str, Any]:
        message = super()._build_message(body, api_key)
        turns = sum(1 for m in body["messages"] if m["role"] == "assistant")
        if turns < 2:
            message["content"] = [
                {"type": "tool_use", "id": f"toolu_{turns}", "name": "read_context", "input": {"key": "notes"}}
            ]
            message["stop_reason"] = "tool_use"
        return message


def team() -> pb.Team:
    return pb.Team(
        name="bench",
        agents=[
            pb.Agent(name="solo", model=MODEL, system_prompt="Answer briefly.", tools=["read_context"], max_tokens=64)
        ],
    )


async def direct_run(state, proxy, md, i: int) -> tuple[float, float]:
    """The state and proxy calls of one run, made directly; returns (seconds in all, seconds up to the last append).

    The second figure spans what an orchestrated run does between its first step's and its last step's
    timestamps (a step is stamped when it is made, before its append): CreateThread, appends 1..6, the
    3 model calls and 2 context reads; not the 7th append."""
    thread = f"bench-direct-{os.getpid()}-{i}-{time.monotonic_ns()}"
    payload = b'{"index":1,"kind":"model_call","agent":"solo","summary":"x","detail":{}}' * 3
    messages = [
        inference_pb2.Message(
            role=inference_pb2.ROLE_USER,
            content=[inference_pb2.ContentBlock(text=inference_pb2.TextBlock(text="What is in my notes?"))],
        )
    ]
    params: dict[str, Any] = dict(
        model=MODEL,
        max_tokens=64,
        system=[inference_pb2.TextBlock(text="Answer briefly.")],
        tools=[inference_pb2.Tool(name="read_context", description="read")],
    )
    t0 = time.perf_counter()
    await state.CreateThread(state_pb2.CreateThreadRequest(thread_id=thread), metadata=md)
    version = 0

    async def append() -> None:
        nonlocal version
        await state.AppendEvents(
            state_pb2.AppendEventsRequest(
                thread_id=thread,
                expected_version=version,
                events=[state_pb2.NewEvent(type=STEP_EVENT_TYPE, payload=payload)],
            ),
            metadata=md,
        )
        version += 1

    await append()
    for call in range(3):
        resp = await proxy.CreateMessage(
            inference_pb2.CreateMessageRequest(params=inference_pb2.MessageParams(messages=messages, **params)),
            metadata=(*md, ("x-request-id", f"{thread}-{call}")),
        )
        await append()
        messages.append(inference_pb2.Message(role=inference_pb2.ROLE_ASSISTANT, content=resp.content))
        if call < 2:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await state.GetContext(
                    state_pb2.GetContextRequest(
                        scope=state_pb2.ContextScope(kind=state_pb2.SCOPE_KIND_RUN, id=thread), key="notes"
                    ),
                    metadata=md,
                )
            await append()
            use = resp.content[0].tool_use
            messages.append(
                inference_pb2.Message(
                    role=inference_pb2.ROLE_USER,
                    content=[
                        inference_pb2.ContentBlock(
                            tool_result=inference_pb2.ToolResultBlock(
                                tool_use_id=use.id,
                                content=[inference_pb2.ContentBlock(text=inference_pb2.TextBlock(text="(no value)"))],
                            )
                        )
                    ],
                )
            )
    last = time.perf_counter()
    await append()
    end = time.perf_counter()
    return end - t0, last - t0


async def orchestrated_run(stub, md) -> tuple[float, list[pb.WatchRunResponse]]:
    """One run through the orchestrator, from StartRun to the end of WatchRun; returns seconds and the stream."""
    t0 = time.perf_counter()
    run = (await stub.StartRun(pb.StartRunRequest(team="bench", input="What is in my notes?"), metadata=md)).run
    msgs = [m async for m in stub.WatchRun(pb.WatchRunRequest(run_id=run.run_id), metadata=md)]
    elapsed = time.perf_counter() - t0
    if msgs[-1].run.status != pb.RUN_STATUS_SUCCEEDED or len(msgs) != STEPS_PER_RUN:
        raise RuntimeError(
            f"run ended {pb.RunStatus.Name(msgs[-1].run.status)} after {len(msgs)} steps: "
            f"{msgs[-1].run.error_reason} {msgs[-1].run.error_message}"
        )
    return elapsed, msgs


async def main(quick: bool, json_to: str | None = None, postgres: bool = False, rounds: int = 3) -> None:
    sequential = 5 if quick else 30
    rounds = 1 if quick else rounds
    tenants_n, per_tenant = (4, 5) if quick else (10, 10)
    env, orch_env, server = {}, {"BULKHEAD_ORCHESTRATOR_MAX_CONCURRENT": "100"}, None
    if postgres:
        from testkit.postgres import start_postgres

        server = start_postgres()
        suffix = f"{os.getpid()}_{time.monotonic_ns() % 10**6}"
        state_db, orch_db = (
            await server.create_database(f"bench_state_{suffix}"),
            await server.create_database(f"bench_orch_{suffix}"),
        )
        env = {"BULKHEAD_STATE_DATABASE_URL": state_db.app_url, "BULKHEAD_STATE_DATABASE_OWNER_URL": state_db.owner_url}
        orch_env.update(
            {
                "BULKHEAD_ORCHESTRATOR_DATABASE_URL": orch_db.app_url,
                "BULKHEAD_ORCHESTRATOR_DATABASE_OWNER_URL": orch_db.owner_url,
            }
        )
    try:
        await _measure(sequential, tenants_n, per_tenant, rounds, json_to, env, orch_env, postgres)
    finally:
        if server is not None:
            server.stop()


async def _measure(
    sequential: int,
    tenants_n: int,
    per_tenant: int,
    rounds: int,
    json_to: str | None,
    env: dict[str, str],
    orch_env: dict[str, str],
    postgres: bool,
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with (
            ThreeStepUpstream() as upstream,
            running_mesh(Path(tmp), upstream_url=upstream.base_url, env=env, orchestrator_env=orch_env) as mesh,
        ):
            print(f"databases of state and the orchestrator: {'Postgres' if postgres else 'SQLite'}")
            tenants = [await mesh.tenant() for _ in range(tenants_n)]
            stub = mesh.stub
            if stub is None:
                raise RuntimeError("the mesh started without an orchestrator")
            for t in tenants:
                await stub.CreateTeam(pb.CreateTeamRequest(team=team()), metadata=t.metadata)
            state = state_pb2_grpc.StateServiceStub(grpc.aio.insecure_channel(mesh.addr("state")))
            proxy = inference_pb2_grpc.InferenceServiceStub(grpc.aio.insecure_channel(mesh.addr("inference")))
            md = tenants[0].metadata
            # As every service does once it listens: the cyclic collector skips what start-up made (else it
            # walks the whole mesh's start-up heap again and again, more each round).
            freeze_startup_heap()
            await direct_run(state, proxy, md, -1)  # warm up both paths
            await orchestrated_run(mesh.stub, md)
            direct, direct_steps, orch, orch_steps = [], [], [], []
            for i in range(sequential):  # interleaved, so drift hits both alike
                total, to_last = await direct_run(state, proxy, md, i)
                direct.append(total)
                direct_steps.append(to_last)
                elapsed, msgs = await orchestrated_run(mesh.stub, md)
                orch.append(elapsed)
                stamps = [m.step.create_time.ToNanoseconds() / 1e9 for m in msgs]
                orch_steps.append(stamps[-1] - stamps[0])
            d, o = statistics.median(direct), statistics.median(orch)
            ds, os_ = statistics.median(direct_steps), statistics.median(orch_steps)
            n = STEPS_PER_RUN - 1
            print(f"sequential runs: {sequential} each, {STEPS_PER_RUN} steps/run (3 model, 2 tool)")
            print(
                f"  whole run   direct proxy+state calls {d * 1000:7.1f} ms   orchestrated (StartRun..WatchRun end) "
                f"{o * 1000:7.1f} ms   ratio {o / d:4.2f}x   per run +{(o - d) * 1000:5.1f} ms"
            )
            print(
                f"  steps 1..{STEPS_PER_RUN}  direct {ds * 1000:7.1f} ms   orchestrated {os_ * 1000:7.1f} ms   "
                f"overhead per step {(os_ - ds) / n * 1000:5.2f} ms   (targets: <= 10 ms per run, <= 1 ms per step)"
            )

            total = tenants_n * per_tenant
            gate = asyncio.Semaphore(4 * tenants_n)  # the direct baseline at the orchestrator's concurrency

            async def gated_direct(t, i: int) -> None:
                async with gate:
                    await direct_run(state, proxy, t.metadata, 10_000 + i)

            async def direct_phase(r: int) -> float:
                t0 = time.perf_counter()
                await asyncio.gather(*(gated_direct(t, r * total + i) for i in range(per_tenant) for t in tenants))
                return time.perf_counter() - t0

            async def orchestrated_phase() -> tuple[float, list]:
                t0 = time.perf_counter()
                results = await asyncio.gather(
                    *(orchestrated_run(mesh.stub, t.metadata) for _ in range(per_tenant) for t in tenants)
                )
                return time.perf_counter() - t0, results

            print(
                f"\nconcurrent: {total} runs across {tenants_n} tenants (limit 4 running per tenant; the direct "
                f"calls {4 * tenants_n} at a time), {rounds} round(s), the two sides in turns"
            )
            ratios: list[float] = []
            rates: list[float] = []
            waits: dict[int, list[float]] = {}
            for r in range(rounds):
                # Each side goes first in every other round, so drift over the rounds hits both alike.
                if r % 2 == 0:
                    direct_wall = await direct_phase(r)
                    wall, results = await orchestrated_phase()
                else:
                    wall, results = await orchestrated_phase()
                    direct_wall = await direct_phase(r)
                ratios.append(direct_wall / wall)
                rates.append(total / wall)
                print(
                    f"  round {r + 1}: direct {total / direct_wall:6.1f} runs/s   orchestrated "
                    f"{total / wall:6.1f} runs/s   {total * STEPS_PER_RUN / wall:6.1f} steps/s   "
                    f"ratio {direct_wall / wall:4.2f}"
                )
                for i, (_, msgs) in enumerate(results):
                    times = [m.step.create_time.ToNanoseconds() / 1e9 for m in msgs]
                    waits.setdefault(i % tenants_n, []).extend(b - a for a, b in itertools.pairwise(times))
            ratio, rate = statistics.median(ratios), statistics.median(rates)
            print(f"  median over the rounds: orchestrated {rate:.1f} runs/s, ratio {ratio:.3f}   (target >= 0.8)")
            medians = [statistics.median(w) * 1000 for w in waits.values()]
            print(
                f"  median step wait per tenant: min {min(medians):.1f} ms  max {max(medians):.1f} ms  "
                f"max/min {max(medians) / min(medians):.2f}   (target <= 2.00)"
            )
            write_json(
                json_to,
                {
                    "fixed_per_run_ms": (o - d) * 1000,
                    "per_step_ms": (os_ - ds) / n * 1000,
                    "whole_run_ratio": o / d,
                    "concurrent_runs": total,
                    "concurrent_runs_per_s": rate,
                    "concurrent_vs_direct_ratio": ratio,
                    "step_wait_max_over_min_ratio": max(medians) / min(medians),
                },
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few-second smoke run")
    parser.add_argument(
        "--postgres",
        action="store_true",
        help="state and the orchestrator on Postgres (a local server started for the run)",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="concurrent rounds, direct and orchestrated in turns (median reported)"
    )
    add_json_option(parser)
    cli = parser.parse_args()
    asyncio.run(main(cli.quick, cli.json, cli.postgres, cli.rounds))
