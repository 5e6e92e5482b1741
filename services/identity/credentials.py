"""API key format, ids and hashing. A key is `bk_<tenant id>_<key id>_<secret>`: the tenant and key id
let identity find the key's row inside that tenant's rows; only a hash of the secret is stored."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from shared.ids import TENANT_ID_PATTERN

_KEY_RE = re.compile(rf"^bk_({TENANT_ID_PATTERN})_(k_[a-z0-9]+)_([a-f0-9]{{48}})$")
PREFIX_SECRET_CHARS = 4


def new_id(kind: str) -> str:
    """A random id such as t_3kq7v2m5x4cz6hba (16 lower-case base32 characters; shared.ids checks tenant ids)."""
    return f"{kind}_" + base64.b32encode(secrets.token_bytes(10)).decode().lower()


@dataclass(frozen=True)
class ParsedKey:
    """The parts of an API key."""

    tenant_id: str
    key_id: str
    secret: str


def make_api_key(tenant_id: str, key_id: str) -> tuple[str, str, bytes]:
    """(whole key, visible prefix, hash of the secret)."""
    secret = secrets.token_hex(24)
    whole = f"bk_{tenant_id}_{key_id}_{secret}"
    return whole, f"bk_{tenant_id}_{key_id}_{secret[:PREFIX_SECRET_CHARS]}", hash_secret(secret)


def hash_secret(secret: str) -> bytes:
    """SHA-256 of a 192-bit random secret (no slow hash needed: it cannot be guessed)."""
    return hashlib.sha256(secret.encode()).digest()


def parse_api_key(key: str) -> ParsedKey | None:
    """The key's parts, or None when it is not shaped like a Bulkhead key."""
    match = _KEY_RE.match(key.strip())
    return ParsedKey(*match.groups()) if match else None


def secret_matches(secret: str, stored_hash: bytes) -> bool:
    """Constant-time comparison of a presented secret with the stored hash."""
    return hmac.compare_digest(hash_secret(secret), stored_hash)
