"""`bulkhead keys create|list|revoke` and `bulkhead token issue|revoke`."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

from bulkhead.identity.v1 import identity_pb2 as pb
from bulkhead_cli._common import add_connection_args, connect, run_async, table


def register(subparsers) -> None:
    keys = subparsers.add_parser("keys", help="API keys of your tenant")
    sub = keys.add_subparsers(dest="action", required=True)
    create = sub.add_parser("create", help="create an API key (for yourself, or a new principal)")
    create.add_argument("--principal", help="principal id (default: a new principal named by --name)")
    create.add_argument("--name", default="cli", help="display name of the new principal / key")
    create.add_argument("--kind", choices=["user", "service_account", "agent"], default="service_account")
    create.add_argument(
        "--scope",
        action="append",
        default=[],
        dest="scopes",
        help="scope the key may hold (repeatable; default: all of the principal's)",
    )
    create.set_defaults(func=_create)
    listing = sub.add_parser("list", help="list API keys (metadata only)")
    listing.set_defaults(func=_list)
    revoke = sub.add_parser("revoke", help="revoke an API key")
    revoke.add_argument("key_id")
    revoke.set_defaults(func=_revoke)

    token = subparsers.add_parser("token", help="short-lived tokens")
    tsub = token.add_subparsers(dest="action", required=True)
    issue = tsub.add_parser("issue", help="trade the API key for a token (prints it and its tenant)")
    issue.add_argument("--ttl", type=int, default=0, help="lifetime in seconds (default 900, max 3600)")
    issue.add_argument("--scope", action="append", default=[], dest="scopes")
    issue.set_defaults(func=_issue)
    trevoke = tsub.add_parser("revoke", help="revoke a token by its id (jti)")
    trevoke.add_argument("jti")
    trevoke.set_defaults(func=_revoke_token)
    for cmd in (create, listing, revoke, issue, trevoke):
        add_connection_args(cmd)


_KINDS = {
    "user": pb.PRINCIPAL_KIND_USER,
    "service_account": pb.PRINCIPAL_KIND_SERVICE_ACCOUNT,
    "agent": pb.PRINCIPAL_KIND_AGENT,
}


def _when(ts) -> str:
    return ts.ToDatetime().strftime("%Y-%m-%d %H:%M") if ts.seconds else ""


@run_async
async def _create(args: argparse.Namespace) -> None:
    async with await connect(args) as bh:
        principal_id = args.principal
        if not principal_id:
            principal = await bh.identity.CreatePrincipal(
                pb.CreatePrincipalRequest(kind=_KINDS[args.kind], display_name=args.name, scopes=args.scopes or ["*"])
            )
            principal_id = principal.principal.id
        resp = await bh.identity.CreateApiKey(
            pb.CreateApiKeyRequest(principal_id=principal_id, scopes=args.scopes, display_name=args.name)
        )
    k = resp.api_key
    table([[k.id, k.principal_id, " ".join(k.scopes), k.prefix + "…"]], ["key", "principal", "scopes", "prefix"])
    print(f"\nAPI key (shown once, store it now):\n  {resp.secret}")


@run_async
async def _list(args: argparse.Namespace) -> None:
    async with await connect(args) as bh:
        resp = await bh.identity.ListApiKeys(pb.ListApiKeysRequest(page_size=500))
    table(
        [
            [
                k.id,
                k.principal_id,
                k.display_name,
                " ".join(k.scopes),
                k.prefix + "…",
                _when(k.create_time),
                _when(k.last_used_time),
                "revoked" if k.revoke_time.seconds else "active",
            ]
            for k in resp.api_keys
        ],
        ["key", "principal", "name", "scopes", "prefix", "created", "last used", "state"],
    )


@run_async
async def _revoke(args: argparse.Namespace) -> None:
    async with await connect(args) as bh:
        resp = await bh.identity.RevokeApiKey(pb.RevokeApiKeyRequest(api_key_id=args.key_id))
    print(f"revoked {resp.api_key.id} ({resp.api_key.prefix}…)")


@run_async
async def _issue(args: argparse.Namespace) -> None:
    async with await connect(args) as bh:
        creds = bh.auth
        resp = await creds._stub.IssueToken(
            pb.IssueTokenRequest(api_key=creds._api_key or "", scopes=args.scopes, ttl_seconds=args.ttl)
        )
    expires = datetime.fromtimestamp(resp.expire_time.seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    table([[resp.tenant_id, resp.jti, " ".join(resp.scopes), expires]], ["tenant", "jti", "scopes", "expires"])
    print(f"\nexport BULKHEAD_TENANT={resp.tenant_id}\nexport BULKHEAD_TOKEN={resp.token}")


@run_async
async def _revoke_token(args: argparse.Namespace) -> None:
    async with await connect(args) as bh:
        await bh.identity.RevokeToken(pb.RevokeTokenRequest(jti=args.jti))
    print(f"revoked token {args.jti}; services refuse it within seconds")
