"""`bulkhead usage`: chargeback lines (operators) and grouped usage, as a table and optionally CSV.

bulkhead usage --since 2026-03-01 --until 2026-04-01 --csv march.csv     # every tenant, per month and model
bulkhead usage --tenant t_abc --period day                              # one tenant, per day
bulkhead usage query --by model,agent --since 2026-03-01                # your own tenant's usage
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
from collections.abc import Awaitable, Sequence

import grpc
from google.protobuf import timestamp_pb2

from bulkhead.client import pages
from bulkhead.metering.v1 import metering_pb2 as pb
from bulkhead_cli._common import add_connection_args, connect, fail, run_async, table
from shared.errors import RpcFailure

_GROUPINGS = {
    "model": pb.USAGE_GROUPING_MODEL,
    "agent": pb.USAGE_GROUPING_AGENT,
    "principal": pb.USAGE_GROUPING_PRINCIPAL,
    "day": pb.USAGE_GROUPING_DAY,
    "hour": pb.USAGE_GROUPING_HOUR,
}
CHARGEBACK_HEADERS = ("tenant", "period", "model", "calls", "input", "output", "cache_write", "cache_read", "cost_usd")
QUERY_HEADERS = (
    "tenant",
    "period",
    "model",
    "agent",
    "principal",
    "calls",
    "errors",
    "input",
    "output",
    "cache_write",
    "cache_read",
    "cost_usd",
    "unpriced_tokens",
)


def register(subparsers) -> None:
    """Add the `usage` command group."""
    usage = subparsers.add_parser("usage", help="chargeback and usage reports (table, and CSV with --csv)")
    _range_args(usage)
    usage.add_argument("--tenant", default="", help="only this tenant (default: every tenant; operators only)")
    usage.add_argument("--period", choices=("month", "day"), default="month", help="length of each line")
    add_connection_args(usage)
    usage.set_defaults(func=_chargeback)
    sub = usage.add_subparsers(dest="action")
    query = sub.add_parser("query", help="your tenant's usage grouped by model/agent/principal/day/hour")
    _range_args(query)
    query.add_argument("--by", default="model", help="comma-separated: model, agent, principal, day, hour")
    query.add_argument("--model", default="", help="only this model")
    query.add_argument("--agent", default="", help="only this agent")
    query.add_argument("--tenant", default="", help="another tenant's usage (operators only; audited)")
    add_connection_args(query)
    query.set_defaults(func=_query)


def _range_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--since", default=None, help="start date or time, UTC (default: first of this month)")
    parser.add_argument("--until", default=None, help="end date or time, UTC, exclusive (default: now)")
    parser.add_argument("--csv", default=None, metavar="FILE", help="also write the lines to this CSV file")


def parse_time(text: str) -> dt.datetime:
    """A UTC date (2026-03-01) or ISO time (2026-03-01T12:00) as an aware datetime."""
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        fail(f"not a date or time: {text!r} (use YYYY-MM-DD or YYYY-MM-DDTHH:MM)")
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def time_range(args: argparse.Namespace, now: dt.datetime | None = None) -> tuple[dt.datetime, dt.datetime]:
    """--since/--until, defaulting to this month so far."""
    now = now or dt.datetime.now(dt.UTC)
    start = parse_time(args.since) if args.since else now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = parse_time(args.until) if args.until else now
    if end <= start:
        fail("--until must be after --since")
    return start, end


def _ts(value: dt.datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def _day(ts: timestamp_pb2.Timestamp, hourly: bool = False) -> str:
    if not (ts.seconds or ts.nanos):
        return ""
    return ts.ToDatetime().strftime("%Y-%m-%d %H:00" if hourly else "%Y-%m-%d")


def chargeback_rows(resp: pb.ExportChargebackResponse) -> list[list[str]]:
    """One row per chargeback line."""
    return [
        [
            x.tenant_id,
            _day(x.period_start),
            x.model,
            str(x.event_count),
            str(x.tokens.input_tokens),
            str(x.tokens.output_tokens),
            str(x.tokens.cache_write_tokens),
            str(x.tokens.cache_read_tokens),
            x.cost_usd,
        ]
        for x in resp.lines
    ]


def query_rows(rows: Sequence[pb.UsageRow], hourly: bool) -> list[list[str]]:
    """One row per usage group."""
    return [
        [
            r.tenant_id,
            _day(r.period_start, hourly),
            r.model,
            r.agent_id,
            r.principal_id,
            str(r.event_count),
            str(r.error_count),
            str(r.tokens.input_tokens),
            str(r.tokens.output_tokens),
            str(r.tokens.cache_write_tokens),
            str(r.tokens.cache_read_tokens),
            r.cost_usd,
            str(r.unpriced_tokens),
        ]
        for r in rows
    ]


def write_csv(path: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Write rows with a header line."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(headers)
        writer.writerows(rows)


def _emit(args: argparse.Namespace, headers: Sequence[str], rows: list[list[str]], footer: str = "") -> None:
    table(rows, headers)
    if footer:
        print(footer)
    if args.csv:
        write_csv(args.csv, headers, rows)
        print(f"wrote {len(rows)} lines to {args.csv}")


@run_async
async def _chargeback(args: argparse.Namespace) -> None:
    start, end = time_range(args)
    period = pb.CHARGEBACK_PERIOD_DAY if args.period == "day" else pb.CHARGEBACK_PERIOD_MONTH
    async with await connect(args) as bh:
        try:
            resp = await bh.metering.ExportChargeback(
                pb.ExportChargebackRequest(
                    tenant_id=args.tenant, start_time=_ts(start), end_time=_ts(end), period=period
                )
            )
        except grpc.aio.AioRpcError as err:
            if RpcFailure.of(err).reason == "MISSING_SCOPE":  # a tenant's key: chargeback is the operator's view
                fail("PERMISSION_DENIED: chargeback covers every tenant, for operators; yours: bulkhead usage query")
            raise
    _emit(args, CHARGEBACK_HEADERS, chargeback_rows(resp), f"total cost: {resp.total_cost_usd} USD")


@run_async
async def _query(args: argparse.Namespace) -> None:
    start, end = time_range(args)
    names = [n.strip() for n in args.by.split(",") if n.strip()]
    unknown = [n for n in names if n not in _GROUPINGS]
    if unknown:
        fail(f"cannot group by {', '.join(unknown)}: use {', '.join(_GROUPINGS)}")
    flt = pb.UsageFilter(start_time=_ts(start), end_time=_ts(end), model=args.model, agent_id=args.agent)
    group_by = [_GROUPINGS[n] for n in names]
    rows: list[pb.UsageRow] = []
    async with await connect(args) as bh:

        def query(token: str) -> Awaitable[pb.QueryTenantUsageResponse | pb.QueryUsageResponse]:
            if args.tenant:  # an operator's query of one tenant (audited)
                return bh.metering.QueryTenantUsage(
                    pb.QueryTenantUsageRequest(
                        tenant_id=args.tenant, filter=flt, group_by=group_by, page_size=1000, page_token=token
                    )
                )
            return bh.metering.QueryUsage(
                pb.QueryUsageRequest(filter=flt, group_by=group_by, page_size=1000, page_token=token)
            )

        async for resp in pages(query):
            rows += resp.rows
    _emit(args, QUERY_HEADERS, query_rows(rows, hourly="hour" in names))
