"""`bulkhead receipts verify FILE`: check a tenant-deletion receipt's Ed25519 signature offline.

A receipt file (written by `bulkhead tenants delete --receipt FILE`) is JSON:
{"receipt": {...}, "signature": b64, "kid": "...", "public_key": b64}. The signature covers
the receipt's canonical JSON (sorted keys, no spaces). The embedded public key proves only that
the file is intact; trust in it comes from --public-key (pinned earlier) or, when identity is
reachable, from its ListSigningKeys listing that kid with the same key.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

EXIT_VALID, EXIT_INVALID, EXIT_UNTRUSTED = 0, 1, 2


class ReceiptError(ValueError):
    """A receipt that does not verify; the message says why."""


def canonical(body: dict) -> bytes:
    """The bytes the signature covers (the same form identity signs)."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def receipt_document(body: bytes, signature: bytes, kid: str, public_key: bytes) -> dict:
    """The file form of a receipt from GetDeletionReceipt's fields."""
    return {
        "receipt": json.loads(body),
        "signature": base64.b64encode(signature).decode(),
        "kid": kid,
        "public_key": base64.b64encode(public_key).decode(),
    }


def verify_document(doc: dict, *, trusted: dict[str, bytes] | None = None) -> dict:
    """The receipt body when the signature holds (and, with `trusted`, the kid's key matches); else ReceiptError."""
    try:
        body, kid = doc["receipt"], doc["kid"]
        signature = base64.b64decode(doc["signature"], validate=True)
        public = base64.b64decode(doc["public_key"], validate=True)
        key = Ed25519PublicKey.from_public_bytes(public)
    except (KeyError, TypeError, ValueError) as exc:
        raise ReceiptError(f"not a receipt file ({type(exc).__name__}: {exc})") from None
    try:
        key.verify(signature, canonical(body))
    except InvalidSignature:
        raise ReceiptError("signature does not match: the receipt was changed after identity signed it") from None
    if trusted is not None and trusted.get(kid) != public:
        raise ReceiptError(f"key {kid} is not one identity vouches for")
    return body


def register(subparsers) -> None:
    parser = subparsers.add_parser("receipts", help="verify tenant-deletion receipts")
    sub = parser.add_subparsers(dest="action", required=True)
    verify = sub.add_parser(
        "verify", help="check a deletion receipt's signature (exit 0 valid, 1 tampered, 2 untrusted)"
    )
    verify.add_argument("file")
    verify.add_argument(
        "--public-key", default=None, help="base64 Ed25519 key to trust (from ListSigningKeys); default: ask identity"
    )
    verify.add_argument(
        "--offline", action="store_true", help="check integrity with the embedded key only, without asking identity"
    )
    verify.set_defaults(func=_verify)


def _verify(args: argparse.Namespace) -> int:
    try:
        doc = json.loads(Path(args.file).read_text())
    except (OSError, ValueError) as exc:
        print(
            f"error: cannot read {args.file}: {exc}; pass the file `bulkhead tenants delete --receipt` wrote",
            file=sys.stderr,
        )
        return EXIT_INVALID
    trusted = None
    if args.public_key:
        trusted = {doc.get("kid", ""): base64.b64decode(args.public_key)}
    elif not args.offline:
        trusted = _identity_keys()
        if trusted is None:
            print(
                "error: identity is not reachable to vouch for the signing key; pass --public-key, "
                "or --offline to check integrity only",
                file=sys.stderr,
            )
            return EXIT_UNTRUSTED
    try:
        body = verify_document(doc, trusted=trusted)
    except ReceiptError as exc:
        print(f"INVALID: {exc}", file=sys.stderr)
        return EXIT_INVALID if "signature" in str(exc) or "not a receipt" in str(exc) else EXIT_UNTRUSTED
    services = ", ".join(s["service"] for s in body.get("services", []))
    print(
        f"valid: tenant {body.get('tenant_id')} deleted {body.get('completed_at')}, signed by {doc['kid']} ({services})"
    )
    return EXIT_VALID


def _identity_keys() -> dict[str, bytes] | None:
    """Every key identity publishes, by kid; None when it cannot be asked."""
    import asyncio

    import grpc

    from bulkhead.identity.v1 import identity_pb2, identity_pb2_grpc
    from shared.config import ServiceConfig

    async def fetch() -> dict[str, bytes]:
        async with grpc.aio.insecure_channel(ServiceConfig.from_env("identity").address) as channel:
            resp = await identity_pb2_grpc.IdentityServiceStub(channel).ListSigningKeys(
                identity_pb2.ListSigningKeysRequest(), timeout=5
            )
        return {k.kid: k.public_key for k in resp.keys}

    try:
        return asyncio.run(fetch())
    except grpc.RpcError:
        return None
