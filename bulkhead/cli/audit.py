"""`bulkhead audit verify|list`: the credentials access audit of your tenant."""
from __future__ import annotations

import argparse

from bulkhead.cli._common import add_connection_args, connect, fail, run_async, table
from bulkhead.credentials.v1 import credentials_pb2 as pb


def register(subparsers) -> None:
    """Add the `audit` command group."""
    audit = subparsers.add_parser("audit", help="the hash-chained audit of secret and key access")
    sub = audit.add_subparsers(dest="action", required=True)
    verify = sub.add_parser("verify", help="check the chain; exit 1 if a row was changed or removed")
    verify.set_defaults(func=_verify)
    listing = sub.add_parser("list", help="list access events, oldest first")
    listing.add_argument("--secret", default="", help="only events about this secret")
    listing.add_argument("--limit", type=int, default=100)
    listing.set_defaults(func=_list)
    for cmd in (verify, listing):
        add_connection_args(cmd)


@run_async
async def _verify(args: argparse.Namespace) -> int:
    async with await connect(args) as bh:
        report = await bh.credentials.VerifyAccessEvents(pb.VerifyAccessEventsRequest())
    if not report.intact:
        fail(f"audit chain BROKEN at event {report.first_bad_sequence}: {report.problem} "
             f"({report.events_checked} events read)")
    print(f"audit chain intact: {report.events_checked} events verified")
    return 0


@run_async
async def _list(args: argparse.Namespace) -> None:
    async with await connect(args) as bh:
        resp = await bh.credentials.ListAccessEvents(pb.ListAccessEventsRequest(
            page_size=args.limit, secret_name=args.secret))
    table([[e.sequence, e.time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"), e.principal_id, e.agent_id, e.run_id,
            pb.AccessAction.Name(e.action).removeprefix("ACCESS_ACTION_").lower(), e.secret_name, e.version or "",
            pb.AccessOutcome.Name(e.outcome).removeprefix("ACCESS_OUTCOME_").lower(), e.reason] for e in resp.events],
          ["seq", "time", "principal", "agent", "run", "action", "secret", "version", "outcome", "reason"])
