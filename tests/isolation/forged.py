"""Tokens an attacker can make from a real one: every way a bearer value can lie about its caller."""

from __future__ import annotations

import base64
import json
import time

import jwt

from shared.tokens import ALGORITHM, SigningKey, TokenIssuer


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def parts(token: str) -> tuple[dict, dict, str]:
    """Header, payload and signature of a JWT, unverified."""
    header, payload, signature = token.split(".")
    return json.loads(_unb64(header)), json.loads(_unb64(payload)), signature


def tampered(token: str, **claims) -> str:
    """The token with claims changed and its original signature kept."""
    header, payload, signature = token.split(".")
    changed = {**json.loads(_unb64(payload)), **claims}
    return ".".join((header, _b64(json.dumps(changed).encode()), signature))


def alg_none(token: str) -> str:
    """The token's claims under `alg: none` and no signature, kid kept."""
    header, payload, _ = parts(token)
    return ".".join((_b64(json.dumps({**header, "alg": "none"}).encode()), _b64(json.dumps(payload).encode()), ""))


def signed_by_stranger(token: str, *, kid: str | None = None) -> str:
    """The token's claims signed by a fresh Ed25519 key, under the real kid (or the kid given)."""
    header, payload, _ = parts(token)
    return jwt.encode(
        payload, SigningKey.generate().private_key, algorithm=ALGORITHM, headers={"kid": kid or header["kid"]}
    )


def expired(key: SigningKey, token: str) -> str:
    """A token with the same claims, signed by identity's real key, that expired an hour ago."""
    _, payload, _ = parts(token)
    issued, _ = TokenIssuer(key).issue(
        tenant_id=payload["tid"],
        principal_id=payload["sub"],
        scopes=tuple(payload["scope"].split()),
        tier=payload.get("tier", "pooled"),
        ttl=60,
        now=time.time() - 3600,
    )
    return issued
