"""`bulkhead runs start|watch|list|get|cancel`: run agent teams and follow them live."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable

import grpc

from bulkhead.client import pages
from bulkhead.orchestrator.v1 import orchestrator_pb2 as pb
from bulkhead_cli._common import add_connection_args, connect, fail, run_async, table

_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
DEFAULT_WAIT = 60.0
"""Seconds `runs start` waits for a queued run to start."""
STILL_QUEUED = 3
"""Exit code of `runs start` when its run was still queued after --wait."""
_QUEUE_POLL = 0.5


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return value


def register(subparsers) -> None:
    parser = subparsers.add_parser("runs", help="start, follow, list and cancel team runs")
    sub = parser.add_subparsers(dest="action", required=True)
    start = sub.add_parser("start", help="start a run and follow it until it ends")
    start.add_argument("team")
    start.add_argument("input", nargs="?", help="the request (default: read stdin)")
    start.add_argument("--agent", default="", help="entry agent (default: the team's first)")
    start.add_argument("--key", default="", help="idempotency key: the same key never starts a second run")
    start.add_argument("--detach", action="store_true", help="print the run id and return at once")
    start.add_argument(
        "--wait",
        type=_seconds,
        default=DEFAULT_WAIT,
        metavar="SECONDS",
        help=f"how long a queued run may wait to start before the command gives up, exit code "
        f"{STILL_QUEUED} (the run stays queued; default {DEFAULT_WAIT:g})",
    )
    start.set_defaults(func=_start)
    watch = sub.add_parser("watch", help="follow a run's steps live until it ends")
    watch.add_argument("run_id")
    watch.add_argument("--after", type=int, default=0, help="only steps after this one")
    watch.set_defaults(func=_watch)
    listing = sub.add_parser("list", help="list runs, newest first")
    listing.add_argument("--status", choices=_STATUSES)
    listing.add_argument("--team", default="")
    listing.add_argument("--limit", type=int, default=50)
    listing.set_defaults(func=_list)
    get = sub.add_parser("get", help="show one run")
    get.add_argument("run_id")
    get.set_defaults(func=_get)
    cancel = sub.add_parser("cancel", help="cancel a queued or running run")
    cancel.add_argument("run_id")
    cancel.set_defaults(func=_cancel)
    for cmd in sub.choices.values():
        add_connection_args(cmd)


def status_name(value: int) -> str:
    """RUN_STATUS_SUCCEEDED -> succeeded."""
    return pb.RunStatus.Name(value).removeprefix("RUN_STATUS_").lower()


def step_line(step: pb.Step) -> str:
    """One line of live progress."""
    kind = pb.StepKind.Name(step.kind).removeprefix("STEP_KIND_").lower()
    return f"  [{step.index:>3}] {step.agent:<14} {kind:<16} {step.summary}"


def final_lines(run: pb.Run) -> list[str]:
    """How a run ended, for people."""
    lines = [f"run {run.run_id} {status_name(run.status)} after {run.step_count} steps"]
    if run.status == pb.RUN_STATUS_SUCCEEDED:
        lines.append(run.output)
    elif run.error_reason or run.error_message:
        lines.append(f"{run.error_reason}: {run.error_message}".strip(": "))
    return lines


async def follow(stub, run_id: str, after: int = 0, out=None) -> pb.Run | None:
    """Print every step as it is recorded; reconnects after the last step seen if the stream drops."""
    out = out or sys.stdout
    run = None
    for attempt in range(20):
        try:
            async for msg in stub.WatchRun(pb.WatchRunRequest(run_id=run_id, after_step=after)):
                print(step_line(msg.step), file=out, flush=True)
                after, run = msg.step.index, msg.run
            break
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE or attempt == 19:
                raise
            print(f"  ... connection lost, resuming after step {after}", file=out, flush=True)
            await asyncio.sleep(min(0.5 * 2**attempt, 5))
    run = (await stub.GetRun(pb.GetRunRequest(run_id=run_id))).run
    for line in final_lines(run):
        print(line, file=out)
    return run


def queue_line(queue: pb.RunQueue) -> str:
    """Where a queued run waits, and why, for people."""
    why = (
        "waits for one of them to finish"
        if queue.running >= queue.limit
        else "waits for the orchestrator to pick it up"
    )
    return (
        f"queued: position {queue.position} in this tenant's queue; {queue.running} of {queue.limit} "
        f"concurrent runs in use, so it {why}"
    )


async def wait_to_start(stub, run_id: str, wait: float, out=None) -> bool:
    """Poll a queued run until it leaves the queue (True) or `wait` seconds pass (False).

    Says where the run waits, and again when that changes, but not for a run picked up at once.
    """
    out = out or sys.stdout
    deadline = asyncio.get_running_loop().time() + wait
    shown = None
    while asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(_QUEUE_POLL)
        got = await stub.GetRun(pb.GetRunRequest(run_id=run_id))
        if got.run.status != pb.RUN_STATUS_QUEUED:
            return True
        if got.HasField("queue") and got.queue != shown:
            print(queue_line(got.queue), file=out, flush=True)
            shown = got.queue
    return False


def _exit_code(run: pb.Run | None) -> int:
    return 0 if run is not None and run.status == pb.RUN_STATUS_SUCCEEDED else 1


@run_async
async def _start(args: argparse.Namespace) -> int:
    text = args.input if args.input is not None else sys.stdin.read()
    if not text.strip():
        fail("give the run's input as an argument or on stdin")
    async with await connect(args) as bh:
        started = await bh.orchestrator.StartRun(
            pb.StartRunRequest(team=args.team, entry_agent=args.agent, input=text, idempotency_key=args.key)
        )
        run = started.run
        print(f"run {run.run_id} {status_name(run.status)} (team {run.team}, entry {run.entry_agent})", flush=True)
        if args.detach:
            return 0
        if run.status == pb.RUN_STATUS_QUEUED and not await wait_to_start(bh.orchestrator, run.run_id, args.wait):
            fail(
                f"run {run.run_id} is still queued after {args.wait:g}s. It stays queued and starts when a slot "
                f"frees: follow it with `bulkhead runs watch {run.run_id}`, or cancel it with "
                f"`bulkhead runs cancel {run.run_id}`. If none of this tenant's runs is running, check that the "
                "orchestrator is up (`bulkhead up` shows its status).",
                STILL_QUEUED,
            )
        return _exit_code(await follow(bh.orchestrator, run.run_id))


@run_async
async def _watch(args: argparse.Namespace) -> int:
    async with await connect(args) as bh:
        return _exit_code(await follow(bh.orchestrator, args.run_id, args.after))


_LIST_HEADERS = ["run", "team", "status", "agent", "steps", "started (utc)"]


@run_async
async def _list(args: argparse.Namespace) -> None:
    status = getattr(pb, f"RUN_STATUS_{args.status.upper()}") if args.status else pb.RUN_STATUS_UNSPECIFIED
    rows: list[list[object]] = []
    if args.limit <= 0:  # nothing asked for: no call
        table(rows, _LIST_HEADERS)
        return
    async with await connect(args) as bh:

        def page(token: str) -> Awaitable[pb.ListRunsResponse]:  # no more than the rows still wanted
            return bh.orchestrator.ListRuns(
                pb.ListRunsRequest(
                    page_size=min(200, args.limit - len(rows)), page_token=token, status=status, team=args.team
                )
            )

        async for resp in pages(page):
            rows += [
                [
                    r.run_id,
                    r.team,
                    status_name(r.status),
                    r.current_agent,
                    r.step_count,
                    r.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"),
                ]
                for r in resp.runs
            ]
            if len(rows) >= args.limit:
                break
    table(rows, _LIST_HEADERS)


@run_async
async def _get(args: argparse.Namespace) -> None:
    async with await connect(args) as bh:
        run = (await bh.orchestrator.GetRun(pb.GetRunRequest(run_id=args.run_id))).run
    table(
        [[run.run_id, run.team, status_name(run.status), run.current_agent, run.step_count]],
        ["run", "team", "status", "agent", "steps"],
    )
    for line in final_lines(run)[1:]:
        print(line)


@run_async
async def _cancel(args: argparse.Namespace) -> None:
    async with await connect(args) as bh:
        run = (await bh.orchestrator.CancelRun(pb.CancelRunRequest(run_id=args.run_id))).run
    print(
        f"run {run.run_id}: {status_name(run.status)}"
        + (" (stops before its next step)" if run.status == pb.RUN_STATUS_RUNNING else "")
    )
