"""`bulkhead audit list|verify`: the hash-chained audits of a tenant, both kinds.

- the configuration audit (bulkhead.common.v1.ConfigAuditService) that identity, orchestrator,
  metering and inference each keep of the changes to the configuration they own (API keys,
  principals, tenants, teams, quotas, prices, model policies);
- the credentials access audit (every call on a secret or key).

A tenant sees its own chains; an operator names a tenant with --tenant (prices are on t_platform's),
or checks every tenant with `verify --all-tenants`. The credentials access chain answers only its own
tenant, so an operator's --tenant skips it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass

import grpc

from bulkhead.client import Client, describe_error, pages
from bulkhead.common.v1 import audit_pb2 as apb
from bulkhead.common.v1 import audit_pb2_grpc
from bulkhead.credentials.v1 import credentials_pb2 as pb
from bulkhead.identity.v1 import identity_pb2 as idn
from bulkhead_cli._common import add_connection_args, connect, run_async, table

CONFIG_SERVICES = ("identity", "orchestrator", "metering", "inference")
"""The services that keep a configuration chain."""
CALL_TIMEOUT = 10.0
"""Seconds per call: a service that does not answer is reported unreachable, not waited for."""


def register(subparsers) -> None:
    """Add the `audit` command group."""
    audit = subparsers.add_parser("audit", help="the hash-chained audits: configuration changes and secret access")
    sub = audit.add_subparsers(dest="action", required=True)
    verify = sub.add_parser("verify", help="check every chain; exit 1 if an event was changed or removed")
    verify.add_argument("--tenant", default="", help="another tenant's configuration chains (operators only)")
    verify.add_argument("--all-tenants", action="store_true", help="every tenant's configuration chains (operators)")
    verify.add_argument("--strict", action="store_true", help="exit 2 when any chain could not be verified")
    verify.set_defaults(func=_verify)
    listing = sub.add_parser("list", help="list audit events, newest first")
    listing.add_argument("--tenant", default="", help="another tenant's configuration events (operators only)")
    listing.add_argument(
        "--service",
        action="append",
        choices=(*CONFIG_SERVICES, "credentials"),
        help="only this service's chain (repeatable; default: all)",
    )
    listing.add_argument(
        "--action", default="", help="only this action, or actions under it (e.g. team, api_key.create)"
    )
    listing.add_argument("--target", default="", help="only events about this target (e.g. team/support)")
    listing.add_argument("--secret", default="", help="only access events about this secret (credentials chain)")
    listing.add_argument("--limit", type=int, default=50, help="events per chain (default 50)")
    listing.set_defaults(func=_list)
    for cmd in (verify, listing):
        add_connection_args(cmd)


def _config_stub(bh: Client, service: str) -> audit_pb2_grpc.ConfigAuditServiceAsyncStub:
    return audit_pb2_grpc.ConfigAuditServiceStub(bh.channel(service))


@dataclass
class _Check:
    """One chain's verification, as a table row."""

    tenant: str
    service: str
    chain: str
    checked: int = 0
    head: int = 0
    anchor: int = 0
    """Events up to this were pruned by the tenant's retention: verified from anchor + 1."""
    broken_at: int = 0
    problem: str = ""
    unreachable: str = ""
    skipped: str = ""

    @property
    def status(self) -> str:
        if self.skipped:
            return f"skipped: {self.skipped}"
        if self.unreachable:
            return f"NOT VERIFIED: {self.unreachable}"
        if self.broken_at:
            return f"BROKEN at event {self.broken_at}: {self.problem}"
        if self.anchor:
            return f"intact: verified from event {self.anchor + 1}, {self.anchor} pruned by retention"
        return "intact"


def _why(err: grpc.aio.AioRpcError) -> str:
    return f"{err.code().name}: {err.details() or ''}".rstrip(": ")


async def _check_config(bh: Client, service: str, tenant: str) -> _Check:
    check = _Check(tenant or "(you)", service, "configuration")
    try:
        r = await _config_stub(bh, service).VerifyAuditEvents(
            apb.VerifyAuditEventsRequest(tenant_id=tenant), timeout=CALL_TIMEOUT
        )
    except grpc.aio.AioRpcError as err:
        check.unreachable = _why(err)
        return check
    check.checked, check.head, check.anchor = r.events_checked, r.head.sequence, r.anchor.sequence
    if not r.intact:
        check.broken_at, check.problem = r.first_bad_sequence or 1, r.problem
    return check


async def _check_access(bh: Client, tenant: str) -> _Check:
    check = _Check(tenant or "(you)", "credentials", "secret access")
    if tenant:
        check.skipped = "only the tenant itself verifies its access chain"
        return check
    try:
        r = await bh.credentials.VerifyAccessEvents(pb.VerifyAccessEventsRequest(), timeout=CALL_TIMEOUT)
    except grpc.aio.AioRpcError as err:
        check.unreachable = _why(err)
        return check
    check.anchor = r.anchor.sequence
    check.checked, check.head = r.events_checked, r.events_checked + r.anchor.sequence
    if not r.intact:
        check.broken_at, check.problem = r.first_bad_sequence or 1, r.problem
    return check


async def _all_tenants(bh: Client) -> list[str]:
    out: list[str] = []
    async for page in pages(
        lambda token: bh.identity.ListTenants(
            idn.ListTenantsRequest(page_size=500, page_token=token), timeout=CALL_TIMEOUT
        )
    ):
        out += [t.id for t in page.tenants if t.status != idn.TENANT_STATUS_DELETED]
    return out


@run_async
async def _verify(args: argparse.Namespace) -> int:
    async with await connect(args) as bh:
        if args.all_tenants:
            tenants = await _all_tenants(bh)
        else:
            tenants = [args.tenant]
        checks: list[_Check] = []
        for tenant in tenants:
            checks += await asyncio.gather(*(_check_config(bh, s, tenant) for s in CONFIG_SERVICES))
        if not args.all_tenants:
            checks.append(await _check_access(bh, args.tenant))
    table(
        [[c.tenant, c.service, c.chain, c.checked, c.head, c.anchor, c.status] for c in checks],
        ["tenant", "service", "chain", "events", "head", "pruned", "status"],
    )
    broken = [c for c in checks if c.broken_at]
    for c in broken:
        print(
            f"error: audit chain BROKEN at event {c.broken_at} in {c.service} ({c.chain}, tenant {c.tenant}): "
            f"{c.problem}",
            file=sys.stderr,
        )
    if broken:
        return 1
    unverified = [c for c in checks if c.unreachable]
    done = [c for c in checks if not (c.unreachable or c.skipped)]
    if not done:
        print("error: no audit chain could be verified (see the table)", file=sys.stderr)
        return 2
    pruned = sum(c.anchor for c in done)
    print(
        f"audit chains intact: {sum(c.checked for c in done)} events verified in {len(done)} chains"
        + (f" ({pruned} older events pruned by retention; each chain verified from its anchor)" if pruned else "")
        + (f"; {len(unverified)} not verified" if unverified else "")
    )
    return 2 if unverified and args.strict else 0


@run_async
async def _list(args: argparse.Namespace) -> int:
    services = args.service or [*CONFIG_SERVICES, "credentials"]
    if args.secret:
        services = ["credentials"]
    if args.tenant or args.target or args.action:
        services = [s for s in services if s != "credentials"]  # the access chain: own, filtered by secret only

    async def one(bh: Client, service: str) -> list[tuple[float, list[object]]]:
        try:
            return await (_access_rows(bh, args) if service == "credentials" else _config_rows(bh, service, args))
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.INVALID_ARGUMENT or (len(services) == 1):
                raise
            print(f"warning: {service}: its events are not listed ({describe_error(err)})", file=sys.stderr)
            return []

    async with await connect(args) as bh:
        rows = [r for chunk in await asyncio.gather(*(one(bh, s) for s in services)) for r in chunk]
    rows.sort(key=lambda r: r[0], reverse=True)
    table([r for _, r in rows], ["time", "service", "seq", "actor", "action", "target", "detail"])
    return 0


async def _config_rows(bh: Client, service: str, args: argparse.Namespace) -> list[tuple[float, list[object]]]:
    page = await _config_stub(bh, service).ListAuditEvents(
        apb.ListAuditEventsRequest(tenant_id=args.tenant, page_size=args.limit, action=args.action, target=args.target),
        timeout=CALL_TIMEOUT,
    )
    if page.anchor.sequence:
        print(
            f"note: {service}: events 1..{page.anchor.sequence} were pruned by the tenant's retention "
            f"(the chain is anchored at event {page.anchor.sequence})",
            file=sys.stderr,
        )
    out = []
    for e in page.events:
        actor = e.actor.principal_id + (" (operator)" if e.actor.operator_id else "")
        if e.actor.delegator_id:
            actor += f" for {e.actor.delegator_id}"
        detail = " ".join(f"{k}={v}" for k, v in sorted(e.detail.items()))
        out.append(
            (
                e.time.ToMicroseconds() / 1e6,
                [
                    e.time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"),
                    service,
                    e.sequence,
                    actor,
                    e.action,
                    e.target,
                    detail,
                ],
            )
        )
    return out


async def _access_rows(bh: Client, args: argparse.Namespace) -> list[tuple[float, list[object]]]:
    # The access chain pages oldest first: read to its end and keep the newest `limit`.
    events: list[pb.AccessEvent] = []
    async for resp in pages(
        lambda token: bh.credentials.ListAccessEvents(
            pb.ListAccessEventsRequest(page_size=1000, page_token=token, secret_name=args.secret), timeout=CALL_TIMEOUT
        )
    ):
        events = (events + list(resp.events))[-args.limit :]
    out = []
    for e in events:
        outcome = pb.AccessOutcome.Name(e.outcome).removeprefix("ACCESS_OUTCOME_").lower()
        detail = " ".join(
            f"{k}={v}"
            for k, v in (
                ("outcome", outcome),
                ("version", e.version or ""),
                ("agent", e.agent_id),
                ("run", e.run_id),
                ("reason", e.reason),
            )
            if v
        )
        out.append(
            (
                e.time.ToMicroseconds() / 1e6,
                [
                    e.time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"),
                    "credentials",
                    e.sequence,
                    e.principal_id,
                    pb.AccessAction.Name(e.action).removeprefix("ACCESS_ACTION_").lower(),
                    e.secret_name,
                    detail,
                ],
            )
        )
    return out
