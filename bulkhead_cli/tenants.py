"""`bulkhead tenants create|list|suspend|resume|delete|migrate` (operator commands)."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from pathlib import Path

from bulkhead.client import pages
from bulkhead.identity.v1 import identity_pb2 as pb
from bulkhead_cli._common import add_connection_args, connect, fail, run_async, table
from bulkhead_cli.receipts import receipt_document
from shared.ids import is_tenant_id
from shared.tiers import Tier, UnknownTier, tier_from_proto, tier_to_proto


def register(subparsers) -> None:
    parser = subparsers.add_parser("tenants", help="create and list tenants (platform operator)")
    sub = parser.add_subparsers(dest="action", required=True)
    create = sub.add_parser("create", help="create a tenant and print its admin API key once")
    create.add_argument("name")
    create.add_argument("--tier", choices=[t.value for t in Tier], default=Tier.POOLED.value)
    create.add_argument(
        "--region",
        default="",
        help="data-residency region (one of the deployment's BULKHEAD_REGIONS; default: its default region)",
    )
    create.set_defaults(func=_create)
    listing = sub.add_parser("list", help="list tenants")
    listing.set_defaults(func=_list)
    for name, status in (("suspend", pb.TENANT_STATUS_SUSPENDED), ("resume", pb.TENANT_STATUS_ACTIVE)):
        cmd = sub.add_parser(name, help=f"{name} a tenant")
        cmd.add_argument("tenant", help="tenant id or name")
        cmd.set_defaults(func=_set_status, status=status)
    retention = sub.add_parser(
        "retention", help="show or set how long a tenant's audit events and usage detail are kept (setting: operators)"
    )
    retention.add_argument("tenant", nargs="?", default="", help="tenant id or name (default: your own)")
    retention.add_argument(
        "--audit-days", type=int, default=None, help="days to keep audit events, 1..3653 (0: the default, 2557)"
    )
    retention.add_argument(
        "--usage-days",
        type=int,
        default=None,
        help="days to keep per-event usage detail, 1..3653 (0: the default, 400); "
        "hourly totals and chargeback are kept regardless",
    )
    retention.set_defaults(func=_retention)
    delete = sub.add_parser("delete", help="delete a tenant by crypto-shredding, after a grace period or now")
    delete.add_argument("tenant_id")
    when = delete.add_mutually_exclusive_group(required=True)
    when.add_argument("--grace", help="suspend now, purge after this long (e.g. 7d, 12h, 30m); resume cancels")
    when.add_argument("--now", action="store_true", help="purge at once (needs --yes)")
    delete.add_argument("--yes", action="store_true", help="confirm --now: keys and data are gone for good")
    delete.add_argument("--receipt", default=None, help="write the signed receipt to this file")
    delete.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for --now to finish")
    delete.set_defaults(func=_delete)
    migrate = sub.add_parser(
        "migrate",
        help="move a tenant to another tier or region live (its requests pause "
        "briefly while each service copies, verifies and switches)",
    )
    migrate.add_argument("tenant", help="tenant id or name")
    migrate.add_argument("--tier", choices=[t.value for t in Tier], help="the tier to move to (default: its tier)")
    migrate.add_argument("--region", help="the data-residency region to move to, e.g. eu (default: its region)")
    migrate.add_argument("--abort", action="store_true", help="roll back the tenant's unfinished migration")
    migrate.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for it to finish")
    migrate.set_defaults(func=_migrate)
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
        resp = await bh.identity.CreateTenant(
            pb.CreateTenantRequest(name=args.name, tier=tier_to_proto(args.tier), region=args.region)
        )
    t = resp.tenant
    table(
        [[t.id, t.name, _tier_name(t.tier), t.region, _status_name(t.status)]],
        ["tenant", "name", "tier", "region", "status"],
    )
    print(f"\nadmin API key (shown once, store it now):\n  {resp.admin_api_key}")
    print(f"use it:  BULKHEAD_API_KEY={resp.admin_api_key[:24]}... bulkhead token issue")


@run_async
async def _list(args: argparse.Namespace) -> None:
    async with await connect(args) as bh:
        rows: list[list[object]] = []
        async for resp in pages(
            lambda token: bh.identity.ListTenants(pb.ListTenantsRequest(page_size=200, page_token=token))
        ):
            rows += [
                [
                    t.id,
                    t.name,
                    _tier_name(t.tier),
                    t.region,
                    _status_name(t.status),
                    t.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M"),
                    _retention_text(t.retention),
                ]
                for t in resp.tenants
            ]
    table(rows, ["tenant", "name", "tier", "region", "status", "created (utc)", "retention audit/usage"])


def _retention_text(policy: pb.RetentionPolicy) -> str:
    if not policy.audit_days:  # an older server that does not say
        return "-"
    return f"{policy.audit_days}d / {policy.usage_detail_days}d"


async def _tenant_id(bh, tenant: str) -> str:
    """An id as given; a name looked up among the tenants (operators)."""
    if not tenant or is_tenant_id(tenant):
        return tenant
    async for resp in pages(
        lambda token: bh.identity.ListTenants(pb.ListTenantsRequest(page_size=200, page_token=token))
    ):
        for t in resp.tenants:
            if t.name == tenant:
                return t.id
    fail(f"no tenant named {tenant!r}")


@run_async
async def _retention(args: argparse.Namespace) -> None:
    async with await connect(args) as bh:
        tenant_id = await _tenant_id(bh, args.tenant)
        resp: pb.GetRetentionPolicyResponse | pb.SetRetentionPolicyResponse
        if args.audit_days is None and args.usage_days is None:
            resp = await bh.identity.GetRetentionPolicy(pb.GetRetentionPolicyRequest(tenant_id=tenant_id))
        else:
            if args.audit_days is None or args.usage_days is None:  # keep the other field as it is
                now = (
                    await bh.identity.GetRetentionPolicy(pb.GetRetentionPolicyRequest(tenant_id=tenant_id))
                ).retention
                if args.audit_days is None:
                    args.audit_days = 0 if now.audit_days_default else now.audit_days
                if args.usage_days is None:
                    args.usage_days = 0 if now.usage_detail_days_default else now.usage_detail_days
            resp = await bh.identity.SetRetentionPolicy(
                pb.SetRetentionPolicyRequest(
                    tenant_id=tenant_id, audit_days=args.audit_days, usage_detail_days=args.usage_days
                )
            )
    r = resp.retention
    table(
        [
            [
                resp.tenant_id,
                f"{r.audit_days}" + (" (default)" if r.audit_days_default else ""),
                f"{r.usage_detail_days}" + (" (default)" if r.usage_detail_days_default else ""),
            ]
        ],
        ["tenant", "audit days", "usage detail days"],
    )
    print(
        "older audit events are pruned (each chain verified from its oldest kept event); older usage detail is "
        "pruned, hourly totals and chargeback are kept"
    )


@run_async
async def _set_status(args: argparse.Namespace) -> None:
    async with await connect(args) as bh:
        tenant_id = await _tenant_id(bh, args.tenant)
        resp = await bh.identity.UpdateTenantStatus(
            pb.UpdateTenantStatusRequest(tenant_id=tenant_id, status=args.status)
        )
    print(f"{resp.tenant.id} is now {_status_name(resp.tenant.status)}")


_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """Seconds in "7d", "12h", "30m" or "45s"; ValueError otherwise."""
    match = _DURATION.match(text.strip())
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"bad duration {text!r}: use e.g. 7d, 12h, 30m")
    return int(match.group(1)) * _UNIT[match.group(2)]


@run_async
async def _delete(args: argparse.Namespace) -> None:
    if args.now and not args.yes:
        fail(
            f"--now destroys {args.tenant_id}'s keys and data for good: add --yes to confirm, "
            "or use --grace 7d to keep it restorable for a while"
        )
    try:
        grace = 0 if args.now else parse_duration(args.grace)
    except ValueError as exc:
        fail(str(exc))
    async with await connect(args) as bh:
        resp = await bh.identity.DeleteTenant(
            pb.DeleteTenantRequest(tenant_id=args.tenant_id, grace_seconds=grace, now=args.now)
        )
        deletion = resp.deletion
        if not args.now and deletion.state == pb.DELETION_STATE_SCHEDULED:
            at = deletion.delete_after_time.ToDatetime().strftime("%Y-%m-%d %H:%M UTC")
            print(
                f"{args.tenant_id} is suspended and will be deleted after {at}.\n"
                f"to cancel: bulkhead tenants resume {args.tenant_id}"
            )
            return
        receipt = await _follow(bh, args.tenant_id, args.timeout)
    doc = receipt_document(receipt.body, receipt.signature, receipt.kid, receipt.public_key)
    _print_receipt(doc)
    if args.receipt:
        Path(args.receipt).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        print(f"receipt saved to {args.receipt}; check it any time with: bulkhead receipts verify {args.receipt}")


async def _follow(bh, tenant_id: str, timeout: float):
    """Print each service's step as it completes; the receipt once signed."""
    shown: dict[str, str] = {}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        resp = await bh.identity.GetDeletionReceipt(pb.GetDeletionReceiptRequest(tenant_id=tenant_id))
        for step in resp.deletion.steps:
            line = (
                "done"
                if step.done
                else (f"retrying ({step.attempts} failed: {step.last_error})" if step.attempts else "")
            )
            if line and shown.get(step.service) != line:
                print(f"  {step.service:<13} {line}", flush=True)
                shown[step.service] = line
        if resp.deletion.state == pb.DELETION_STATE_DONE:
            return resp.receipt
        if loop.time() > deadline:
            fail(
                f"the deletion of {tenant_id} is still running (identity retries failed steps on its own); "
                f"see progress with: bulkhead tenants delete {tenant_id} --now --yes  (it resumes, never repeats)"
            )
        await asyncio.sleep(0.5)


def _print_receipt(doc: dict) -> None:
    body = doc["receipt"]
    print(f"\ndeletion receipt for {body['tenant_id']} ({body['tier']}), completed {body['completed_at']}")
    rows = []
    for svc in body["services"]:
        keys = ", ".join(k["key_id"] for k in svc["destroyed_keys"]) or "-"
        kept = ", ".join(f"{k['table']} ({k['rows']})" for k in svc["kept"] if k["rows"]) or "-"
        rows.append([svc["service"], str(svc["rows_deleted"]), ", ".join(svc["dropped_stores"]) or "-", keys, kept])
    table(rows, ["service", "rows deleted", "stores dropped", "keys destroyed", "kept"])
    print(f"signed by identity key {doc['kid']}")


_FINISHED = (pb.MIGRATION_STATE_DONE, pb.MIGRATION_STATE_ABORTED)


@run_async
async def _migrate(args: argparse.Namespace) -> None:
    if args.abort == bool(args.tier or args.region):
        fail("say where to move the tenant (--tier, --region or both), or --abort")
    async with await connect(args) as bh:
        tenant_id = await _tenant_id(bh, args.tenant)
        request = pb.MigrateTenantRequest(tenant_id=tenant_id, abort=args.abort, target_region=args.region or "")
        if args.tier:
            request.target_tier = tier_to_proto(args.tier)
        resp = await bh.identity.MigrateTenant(request)
        m = resp.migration
        print(
            f"{'aborting' if args.abort else 'migrating'} {args.tenant} ({tenant_id}): "
            f"{_placement(m.source_tier, m.source_region, m)} -> {_placement(m.target_tier, m.target_region, m)}",
            flush=True,
        )
        m = await _follow_migration(bh, tenant_id, args.timeout)
    rows = [
        [
            s.service,
            str(len(s.tables)),
            str(sum(t.rows for t in s.tables)),
            "yes" if all(t.equal for t in s.tables) else "NO",
            s.phase,
        ]
        for s in m.steps
    ]
    table(rows, ["service", "tables", "rows", "checksums equal", "phase"])
    for step in m.steps:
        if step.tables:
            print(
                f"  {step.service}: "
                + ", ".join(f"{t.table} {t.rows}{'' if t.equal else ' (DIFFERS)'}" for t in step.tables)
            )
    if m.state == pb.MIGRATION_STATE_DONE:
        print(
            f"{args.tenant} is {_placement(m.target_tier, m.target_region, m)} now (placement generation "
            f"{m.generation}); its requests were paused {m.pause_ms} ms"
        )
    else:
        print(f"aborted: {args.tenant} stays {_placement(m.source_tier, m.source_region, m)}")


def _placement(tier: int, region: str, m: pb.TenantMigration) -> str:
    """A side of a migration: its tier, and its region when the move changes it ("silo in eu")."""
    return f"{_tier_name(tier)} in {region}" if region and m.source_region != m.target_region else _tier_name(tier)


async def _follow_migration(bh, tenant_id: str, timeout: float) -> pb.TenantMigration:
    """Print each service's phase and tables as they change; the migration once finished."""
    shown: dict[str, str] = {}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        m = (await bh.identity.GetMigration(pb.GetMigrationRequest(tenant_id=tenant_id))).migration
        for step in m.steps:
            line = step.phase
            if step.tables and step.phase == "copied":
                line += ": " + ", ".join(f"{t.table} {t.rows}{'' if t.equal else ' (differs)'}" for t in step.tables)
            if step.last_error:
                line += f" (retrying after {step.attempts} failed: {step.last_error})"
            if shown.get(step.service) != line:
                print(f"  {step.service:<13} {line}", flush=True)
                shown[step.service] = line
        if m.state in _FINISHED:
            return m
        if loop.time() > deadline:
            fail(
                f"the migration of {tenant_id} is still running (identity retries failed steps on its own); "
                f"follow it again with: bulkhead tenants migrate {tenant_id} --tier {_tier_name(m.target_tier)}"
                + (f" --region {m.target_region}" if m.target_region and m.target_region != m.source_region else "")
            )
        await asyncio.sleep(0.3)
