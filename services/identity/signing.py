"""Signing keys: created, rotated, stored encrypted under a key-encryption key, published as a JWKS."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import select, update

from services.identity.store import SigningKeyRow, not_active_rows, platform_reads, revocation_rows
from shared.db import Database
from shared.tokens import SigningKey, public_key_bytes

MAX_TOKEN_TTL = 3600
"""The longest a token lives; a retired key is published this long (plus slack) after retirement."""
_PUBLISH_SLACK = timedelta(seconds=60)
ACTIVE_KEY_REREAD_SECONDS = 1.0
"""How long a replica signs with the active key it read before reading it again."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes: they were stored as UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def load_or_create_kek(path: Path) -> bytes:
    """The 256-bit key-encryption key in `path`, created with mode 0600 on first use."""
    if path.exists():
        return path.read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = AESGCM.generate_key(bit_length=256)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
    return key


class SigningKeys:
    """The signing-key ring in identity's database."""

    def __init__(self, db: Database, kek: bytes):
        self._db = db
        self._aead = AESGCM(kek)
        self._active: tuple[SigningKey, float] | None = None
        """The active key as last read (or made here) and when, monotonic (see ACTIVE_KEY_REREAD_SECONDS)."""
        self._rotations = 0

    def _seal(self, key: SigningKey) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, key.private_bytes(), key.kid.encode())

    def _open(self, row: SigningKeyRow) -> SigningKey:
        blob = row.encrypted_private_key
        return SigningKey.from_private_bytes(row.kid, self._aead.decrypt(blob[:12], blob[12:], row.kid.encode()))

    async def active(self) -> SigningKey:
        """The key that signs now; made on first start. Read again at most every ACTIVE_KEY_REREAD_SECONDS (every
        token issued or exchanged asks): a rotation here applies at once, another replica's within that time,
        and the key it retired keeps verifying meanwhile (published() still lists it)."""
        cached = self._active
        if cached is not None and time.monotonic() - cached[1] < ACTIVE_KEY_REREAD_SECONDS:
            return cached[0]
        rotations = self._rotations
        async with self._db.system_session() as s:
            row = (await s.execute(select(SigningKeyRow).where(SigningKeyRow.active.is_(True)))).scalar_one_or_none()
            if row is not None:
                key = self._open(row)
                if rotations == self._rotations:  # not a read from before a rotation here
                    self._active = (key, time.monotonic())
                return key
        return await self.rotate()

    async def rotate(self) -> SigningKey:
        """Retire the active key (it keeps verifying) and start signing with a new one."""
        key = SigningKey.generate()
        now = utcnow()
        async with self._db.system_session() as s:
            await s.execute(
                update(SigningKeyRow).where(SigningKeyRow.active.is_(True)).values(active=False, retired_at=now)
            )
            s.add(
                SigningKeyRow(
                    kid=key.kid,
                    public_key=public_key_bytes(key.public_key),
                    encrypted_private_key=self._seal(key),
                    active=True,
                    created_at=now,
                )
            )
        self._rotations += 1
        self._active = (key, time.monotonic())
        return key

    async def published(self) -> list[SigningKeyRow]:
        """Keys that may have signed a live token: the active one and recently retired ones."""
        cutoff = utcnow() - timedelta(seconds=MAX_TOKEN_TTL) - _PUBLISH_SLACK
        async with self._db.system_session() as s:
            rows = (await s.execute(select(SigningKeyRow).order_by(SigningKeyRow.created_at))).scalars().all()
        return [r for r in rows if r.active or (r.retired_at and as_utc(r.retired_at) > cutoff)]


class StoreKeyLoader:
    """KeyLoader over identity's own tables (identity verifies tokens the same way as everyone)."""

    def __init__(self, keys: SigningKeys, db: Database):
        self._keys = keys
        self._db = db

    async def load_keys(self) -> dict[str, Ed25519PublicKey]:
        return {r.kid: Ed25519PublicKey.from_public_bytes(r.public_key) for r in await self._keys.published()}

    async def load_revocations(self, since: int) -> tuple[int, dict[str, int]]:
        return await revocations_since(self._db, since)

    async def load_suspended(self) -> frozenset[str]:
        return await suspended_tenants(self._db)


async def suspended_tenants(db: Database) -> frozenset[str]:
    """The tenants that are not active (suspended, being deleted, or deleted within the longest token
    lifetime): every verifier refuses their tokens. Later no token of a deleted tenant can be live,
    so the list verifiers poll every second does not grow with every tenant ever deleted."""
    now = utcnow()
    async with platform_reads(db) as tx:
        return refused_tenants(await not_active_rows(tx), now)


def refused_tenants(rows: Iterable[tuple[str, str, datetime | None]], now: datetime) -> frozenset[str]:
    """suspended_tenants() of store.not_active_rows read at `now`."""
    cutoff = now - timedelta(seconds=MAX_TOKEN_TTL) - _PUBLISH_SLACK
    return frozenset(tid for tid, status, done in rows if status != "deleted" or done is None or as_utc(done) > cutoff)


async def revocations_since(db: Database, since: int) -> tuple[int, dict[str, int]]:
    """(latest revision, {jti: expiry}) of unexpired revocations after revision `since`."""
    now = utcnow()
    async with platform_reads(db) as tx:
        return live_revocations(await revocation_rows(tx, since), since, now)


def live_revocations(rows: list[tuple[int, str, datetime]], since: int, now: datetime) -> tuple[int, dict[str, int]]:
    """revocations_since() of store.revocation_rows read at `now`."""
    revision = max((r[0] for r in rows), default=since)
    return revision, {jti: int(as_utc(exp).timestamp()) for _, jti, exp in rows if as_utc(exp) > now}
