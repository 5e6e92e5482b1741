"""`bulkhead secrets put|get|list|describe|rotate|delete`: the tenant's secrets.

Values are read from stdin (when piped) or a no-echo prompt, never from the command line, where
they would land in shell history and `ps`.
"""

from __future__ import annotations

import argparse
import sys

from google.protobuf import duration_pb2

from bulkhead.client import pages
from bulkhead.credentials.v1 import credentials_pb2 as pb
from bulkhead_cli._common import (
    add_connection_args,
    connect,
    fail,
    read_secret_value,
    run_async,
    table,
)

_STATES = {
    pb.SECRET_VERSION_STATE_CURRENT: "current",
    pb.SECRET_VERSION_STATE_PREVIOUS: "previous",
    pb.SECRET_VERSION_STATE_DELETED: "deleted",
    pb.SECRET_VERSION_STATE_DESTROYED: "destroyed",
}


def register(subparsers) -> None:
    """Add the `secrets` command group."""
    secrets = subparsers.add_parser("secrets", help="your tenant's secrets (values via stdin or a prompt)")
    sub = secrets.add_subparsers(dest="action", required=True)
    put = sub.add_parser("put", help="store a new version; the value is read from stdin or a prompt")
    put.add_argument("name")
    put.add_argument("--cas", type=int, default=None, help="only write if the current version is this (0: new)")
    put.add_argument("--description", default="")
    put.add_argument(
        "--rotate-every",
        type=int,
        default=None,
        metavar="SECONDS",
        help="rotation period in seconds (0 turns rotation off)",
    )
    put.add_argument("--rotator", default="", help="rotator for scheduled rotation (default: random)")
    put.add_argument(
        "--grace", type=int, default=None, metavar="SECONDS", help="how long superseded versions stay readable"
    )
    put.set_defaults(func=_put)
    get = sub.add_parser("get", help="print a value to stdout")
    get.add_argument("name")
    get.add_argument("--version", type=int, default=0)
    get.set_defaults(func=_get)
    listing = sub.add_parser("list", help="list secrets (metadata only)")
    listing.add_argument("--show-deleted", action="store_true")
    listing.set_defaults(func=_list)
    describe = sub.add_parser("describe", help="versions, rotation schedule and last access of a secret")
    describe.add_argument("name")
    describe.set_defaults(func=_describe)
    rotate = sub.add_parser("rotate", help="rotate now through the secret's rotator")
    rotate.add_argument("name")
    rotate.set_defaults(func=_rotate)
    delete = sub.add_parser("delete", help="soft-delete a secret (--destroy: remove every version for good)")
    delete.add_argument("name")
    delete.add_argument("--destroy", action="store_true")
    delete.set_defaults(func=_delete)
    for cmd in (put, get, listing, describe, rotate, delete):
        add_connection_args(cmd)


def _when(ts) -> str:
    return ts.ToDatetime().strftime("%Y-%m-%d %H:%M:%S") if ts.seconds else ""


@run_async
async def _put(args: argparse.Namespace) -> None:
    value = read_secret_value(f"value for {args.name}: ")
    if not value:
        fail("empty value: pipe the value on stdin or type it at the prompt")
    request = pb.PutSecretRequest(
        name=args.name, value=value.encode(), description=args.description, rotator=args.rotator
    )
    if args.cas is not None:
        request.cas = args.cas
    if args.rotate_every is not None:
        request.rotation_period.CopyFrom(duration_pb2.Duration(seconds=args.rotate_every))
    if args.grace is not None:
        request.grace_period.CopyFrom(duration_pb2.Duration(seconds=args.grace))
    async with await connect(args) as bh:
        resp = await bh.credentials.PutSecret(request)
    print(f"stored {resp.secret.name} version {resp.secret.current_version}")


@run_async
async def _get(args: argparse.Namespace) -> None:
    async with await connect(args) as bh:
        resp = await bh.credentials.GetSecret(pb.GetSecretRequest(name=args.name, version=args.version))
    sys.stdout.buffer.write(resp.value)
    sys.stdout.flush()


@run_async
async def _list(args: argparse.Namespace) -> None:
    rows: list[list[object]] = []
    async with await connect(args) as bh:
        async for resp in pages(
            lambda token: bh.credentials.ListSecrets(
                pb.ListSecretsRequest(page_size=500, page_token=token, show_deleted=args.show_deleted)
            )
        ):
            rows += [
                [
                    s.name,
                    s.current_version,
                    s.rotation_period.seconds or "",
                    _when(s.next_rotation_time),
                    _when(s.update_time),
                    "deleted" if s.delete_time.seconds else "",
                ]
                for s in resp.secrets
            ]
    table(rows, ["name", "version", "rotate every", "next rotation", "updated", "state"])


@run_async
async def _describe(args: argparse.Namespace) -> None:
    async with await connect(args) as bh:
        s = (await bh.credentials.DescribeSecret(pb.DescribeSecretRequest(name=args.name))).secret
    print(
        f"{s.name}: version {s.current_version}, rotator {s.rotator}, "
        f"rotate every {s.rotation_period.seconds or 'never'}, last read {_when(s.last_access_time) or 'never'}"
    )
    table(
        [
            [v.version, _STATES.get(v.state, "?"), _when(v.create_time), _when(v.expire_time), v.created_by, v.origin]
            for v in s.versions
        ],
        ["version", "state", "created", "expires", "by", "origin"],
    )


@run_async
async def _rotate(args: argparse.Namespace) -> None:
    async with await connect(args) as bh:
        resp = await bh.credentials.RotateSecret(pb.RotateSecretRequest(name=args.name))
    print(f"rotated {resp.secret.name} to version {resp.secret.current_version}")


@run_async
async def _delete(args: argparse.Namespace) -> None:
    async with await connect(args) as bh:
        if args.destroy:
            resp = await bh.credentials.DestroySecret(pb.DestroySecretRequest(name=args.name))
            print(f"destroyed {args.name} ({resp.destroyed_versions} versions)")
        else:
            await bh.credentials.DeleteSecret(pb.DeleteSecretRequest(name=args.name))
            print(f"deleted {args.name} (values kept until `bulkhead secrets delete --destroy`)")
