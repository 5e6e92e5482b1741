"""The `local` backend (embedded default): AES-GCM envelope encryption with `cryptography`.

Each tenant has two key rings ("kv" for secret values, "transit" for Encrypt/Decrypt), each key
wrapped by the master key and stored in the service's database. Associated data binds every
ciphertext to its tenant (and, for values, to the secret name and version), so a row or a
ciphertext moved to another tenant does not decrypt.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError

from services.credentials import store
from services.credentials.backend import (
    DataKey,
    StoredValue,
    TenantRef,
    cas_mismatch,
    decryption_failed,
)
from shared import errors
from shared.db import Database

_NONCE = 12
_CIPHERTEXT = re.compile(rb"^bulkhead:v(\d+):([A-Za-z0-9+/=]+)$")


class _KeyRing:
    """Unwrapped key versions of one tenant and purpose."""

    def __init__(self, keys: dict[int, AESGCM]) -> None:
        self.keys = keys

    @property
    def latest(self) -> int:
        return max(self.keys)


class LocalBackend:
    """SecretBackend and KeyBackend stored in the service's own database."""

    name = "local"

    def __init__(self, db: Database, master_key: bytes) -> None:
        self._db = db
        self._master = AESGCM(master_key)
        self._rings: dict[tuple[str, str], _KeyRing] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    async def close(self) -> None:
        """Forget the unwrapped keys."""
        self._rings.clear()

    def forget_tenant(self, tenant_id: str) -> None:
        """Forget one tenant's unwrapped keys (its key rows were just destroyed: see purge.py)."""
        for key in [k for k in self._rings if k[0] == tenant_id]:
            del self._rings[key]

    # -- key rings ------------------------------------------------------------------------------

    def _wrap_aad(self, tenant: TenantRef, purpose: str, version: int) -> bytes:
        return f"{tenant.tenant_id}|{purpose}|{version}".encode()

    async def _ring(self, tenant: TenantRef, purpose: str, *, reload: bool = False) -> _KeyRing:
        """The tenant's key ring, creating version 1 on first use."""
        key = (tenant.tenant_id, purpose)
        ring = self._rings.get(key)
        if ring is not None and not reload:
            return ring
        async with self._locks.setdefault(key, asyncio.Lock()):
            async with self._db.session() as s:
                rows = (
                    (await s.execute(select(store.LocalKeyRow).where(store.LocalKeyRow.purpose == purpose)))
                    .scalars()
                    .all()
                )
                if not rows:
                    rows = [self._new_key_row(tenant, purpose, 1)]
                    s.add(rows[0])
            try:
                ring = _KeyRing(
                    {
                        r.version: AESGCM(
                            self._master.decrypt(
                                r.wrapped[:_NONCE], r.wrapped[_NONCE:], self._wrap_aad(tenant, purpose, r.version)
                            )
                        )
                        for r in rows
                    }
                )
            except InvalidTag:
                raise errors.BulkheadError(
                    "the master key does not open this tenant's keys (wrong key file?)", reason="MASTER_KEY_MISMATCH"
                ) from None
            self._rings[key] = ring
            return ring

    def _new_key_row(self, tenant: TenantRef, purpose: str, version: int) -> store.LocalKeyRow:
        nonce = os.urandom(_NONCE)
        wrapped = nonce + self._master.encrypt(
            nonce, AESGCM.generate_key(256), self._wrap_aad(tenant, purpose, version)
        )
        return store.LocalKeyRow(purpose=purpose, version=version, wrapped=wrapped, created_us=store.now_us())

    # -- SecretBackend --------------------------------------------------------------------------

    @staticmethod
    def _value_aad(tenant: TenantRef, name: str, version: int) -> bytes:
        return f"kv|{tenant.tenant_id}|{name}|{version}".encode()

    async def write(self, tenant: TenantRef, name: str, value: bytes, *, cas: int | None) -> int:
        """Seal and store a new version; cas as in KV v2."""
        ring = await self._ring(tenant, "kv")
        try:
            async with self._db.session() as s:
                current = (
                    await s.execute(
                        select(func.max(store.LocalValueRow.version)).where(store.LocalValueRow.name == name)
                    )
                ).scalar() or 0
                if cas is not None and cas != current:
                    raise cas_mismatch(cas, current)
                version, nonce = current + 1, os.urandom(_NONCE)
                sealed = nonce + ring.keys[ring.latest].encrypt(nonce, value, self._value_aad(tenant, name, version))
                s.add(store.LocalValueRow(name=name, version=version, key_version=ring.latest, sealed=sealed))
        except IntegrityError:  # a concurrent writer took the same version number
            raise cas_mismatch(cas if cas is not None else current) from None
        return version

    async def read(self, tenant: TenantRef, name: str, version: int | None = None) -> StoredValue:
        """Open a version (None: the latest); deleted or destroyed versions are NotFound."""
        async with self._db.session() as s:
            q = select(store.LocalValueRow).where(store.LocalValueRow.name == name)
            q = (
                q.where(store.LocalValueRow.version == version)
                if version
                else q.order_by(store.LocalValueRow.version.desc()).limit(1)
            )
            row = (await s.execute(q)).scalar_one_or_none()
        if row is None or row.state != "live" or row.sealed is None:
            raise errors.NotFound("that secret version does not exist", reason="SECRET_VERSION_NOT_FOUND")
        ring = await self._ring(tenant, "kv")
        if row.key_version not in ring.keys:
            ring = await self._ring(tenant, "kv", reload=True)
        key = ring.keys.get(row.key_version)
        try:
            if key is None:
                raise InvalidTag()
            value = key.decrypt(row.sealed[:_NONCE], row.sealed[_NONCE:], self._value_aad(tenant, name, row.version))
        except InvalidTag:
            # The row was moved, altered or sealed for someone else: refuse rather than guess.
            raise errors.BulkheadError("a stored value failed its integrity check", reason="VALUE_INTEGRITY") from None
        return StoredValue(row.version, value)

    async def _set_state(self, name: str, versions: list[int], state: str, **values) -> None:
        if not versions:
            return
        async with self._db.session() as s:
            await s.execute(
                update(store.LocalValueRow)
                .where(
                    store.LocalValueRow.name == name,
                    store.LocalValueRow.version.in_(versions),
                    store.LocalValueRow.state != "destroyed",
                )
                .values(state=state, **values)
            )

    async def delete(self, tenant: TenantRef, name: str, versions: list[int]) -> None:
        """Soft-delete versions."""
        await self._set_state(name, versions, "deleted")

    async def destroy(self, tenant: TenantRef, name: str, versions: list[int]) -> None:
        """Destroy versions: the sealed value is overwritten with nothing."""
        await self._set_state(name, versions, "destroyed", sealed=None)

    async def purge(self, tenant: TenantRef, name: str) -> None:
        """Remove every version row of the secret."""
        async with self._db.session() as s:
            await s.execute(delete(store.LocalValueRow).where(store.LocalValueRow.name == name))

    async def versions_after(self, tenant: TenantRef, name: str, version: int) -> dict[int, bool]:
        """The versions after `version`, each with whether it is destroyed."""
        async with self._db.session() as s:
            later = await s.execute(
                select(store.LocalValueRow.version, store.LocalValueRow.state).where(
                    store.LocalValueRow.name == name, store.LocalValueRow.version > version
                )
            )
        return {v: state == "destroyed" for v, state in later}

    # -- KeyBackend -----------------------------------------------------------------------------

    @staticmethod
    def _transit_aad(tenant: TenantRef) -> bytes:
        return f"transit|{tenant.tenant_id}".encode()

    async def encrypt(self, tenant: TenantRef, plaintext: bytes) -> tuple[bytes, int]:
        """Encrypt with the latest version of the tenant's transit key."""
        ring = await self._ring(tenant, "transit")
        version, nonce = ring.latest, os.urandom(_NONCE)
        body = nonce + ring.keys[version].encrypt(nonce, plaintext, self._transit_aad(tenant))
        return b"bulkhead:v%d:%s" % (version, base64.b64encode(body)), version

    async def decrypt(self, tenant: TenantRef, ciphertext: bytes) -> bytes:
        """Decrypt with the version named in the ciphertext; anything else is DECRYPTION_FAILED."""
        match = _CIPHERTEXT.match(ciphertext)
        if not match:
            raise decryption_failed()
        version, body = int(match.group(1)), base64.b64decode(match.group(2))
        ring = await self._ring(tenant, "transit")
        if version not in ring.keys:
            ring = await self._ring(tenant, "transit", reload=True)
        key = ring.keys.get(version)
        if key is None or len(body) <= _NONCE:
            raise decryption_failed()
        try:
            return key.decrypt(body[:_NONCE], body[_NONCE:], self._transit_aad(tenant))
        except InvalidTag:
            raise decryption_failed() from None

    async def generate_data_key(self, tenant: TenantRef, bits: int) -> DataKey:
        """A random key and its wrapping under the tenant's transit key."""
        plaintext = os.urandom(bits // 8)
        wrapped, version = await self.encrypt(tenant, plaintext)
        return DataKey(plaintext, wrapped, version)

    async def rotate_key(self, tenant: TenantRef) -> int:
        """Add a transit key version."""
        ring = await self._ring(tenant, "transit", reload=True)
        try:
            async with self._db.session() as s:
                s.add(self._new_key_row(tenant, "transit", ring.latest + 1))
        except IntegrityError:
            raise errors.Aborted("the key was rotated concurrently; retry", reason="KEY_ROTATION_CONFLICT") from None
        return (await self._ring(tenant, "transit", reload=True)).latest

    async def rewrap(self, tenant: TenantRef, ciphertext: bytes) -> tuple[bytes, int]:
        """Re-encrypt under the latest key version (the plaintext never leaves this process)."""
        return await self.encrypt(tenant, await self.decrypt(tenant, ciphertext))
