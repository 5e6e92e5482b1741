"""`bulkhead tenants create|list|suspend|resume` (operator commands)."""
from __future__ import annotations

import argparse

from bulkhead.cli._common import add_connection_args, connect, run_async, table
from bulkhead.identity.v1 import identity_pb2 as pb
from shared.tiers import Tier, UnknownTier, tier_from_proto, tier_to_proto


def register(subparsers) -> None:
    parser = subparsers.add_parser("tenants", help="create and list tenants (platform operator)")
    sub = parser.add_subparsers(dest="action", required=True)
    create = sub.add_parser("create", help="create a tenant and print its admin API key once")
    create.add_argument("name")
    create.add_argument("--tier", choices=[t.value for t in Tier], default=Tier.POOLED.value)
    create.add_argument("--region", default="local")
    create.set_defaults(func=_create)
    listing = sub.add_parser("list", help="list tenants")
    listing.set_defaults(func=_list)
    for name, status in (("suspend", pb.TENANT_STATUS_SUSPENDED), ("resume", pb.TENANT_STATUS_ACTIVE)):
        cmd = sub.add_parser(name, help=f"{name} a tenant")
        cmd.add_argument("tenant_id")
        cmd.set_defaults(func=_set_status, status=status)
    for cmd in (create, listing, *sub.choices.values()):
        if not any(a.dest == "api_key" for a in cmd._actions):
            add_connection_args(cmd)


def _tier_name(value: int) -> str:
    try:
        return tier_from_proto(value).value
    except UnknownTier:  # a newer server's tier: show it rather than guess
        return f"tier {value}"


def _status_name(value: int) -> str:
    return pb.TenantStatus.Name(value).removeprefix("TENANT_STATUS_").lower()


@run_async
async def _create(args: argparse.Namespace) -> None:
    async with await connect(args) as bh:
        resp = await bh.identity.CreateTenant(pb.CreateTenantRequest(name=args.name, tier=tier_to_proto(args.tier),
                                                                     region=args.region))
    t = resp.tenant
    table([[t.id, t.name, _tier_name(t.tier), t.region, _status_name(t.status)]],
          ["tenant", "name", "tier", "region", "status"])
    print(f"\nadmin API key (shown once, store it now):\n  {resp.admin_api_key}")
    print(f"use it:  BULKHEAD_API_KEY={resp.admin_api_key[:24]}... bulkhead token issue")


@run_async
async def _list(args: argparse.Namespace) -> None:
    async with await connect(args) as bh:
        rows, token = [], ""
        while True:
            resp = await bh.identity.ListTenants(pb.ListTenantsRequest(page_size=200, page_token=token))
            rows += [[t.id, t.name, _tier_name(t.tier), t.region, _status_name(t.status),
                      t.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M")] for t in resp.tenants]
            token = resp.next_page_token
            if not token:
                break
    table(rows, ["tenant", "name", "tier", "region", "status", "created (utc)"])


@run_async
async def _set_status(args: argparse.Namespace) -> None:
    async with await connect(args) as bh:
        resp = await bh.identity.UpdateTenantStatus(pb.UpdateTenantStatusRequest(tenant_id=args.tenant_id,
                                                                                 status=args.status))
    print(f"{resp.tenant.id} is now {_status_name(resp.tenant.status)}")
