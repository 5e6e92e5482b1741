"""Envelope encryption of payloads and values with the tenant's data key.

The wrapped data key is stored (see store.DataKeyRow); the plain key lives only in this
process's memory, for `cache_ttl` seconds at most. Each ciphertext is bound by associated data
to the tenant and the row it belongs to, so ciphertext moved to another row or tenant does not
decrypt.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from services.state.datakeys import DataKeyProvider, DataKeyRejected, DataKeyUnavailable
from shared.errors import BulkheadError, Unavailable
from shared.tenancy import require_tenant

_NONCE = 12
_FORMAT = b"\x01"  # first byte of every ciphertext: lets the format change later


class UndecryptableData(BulkheadError):
    """Stored ciphertext that does not decrypt: tampered, moved between rows, or a foreign key."""

    default_reason = "UNDECRYPTABLE_DATA"


class WrappedKeyStore(Protocol):
    """Persistence of the current tenant's wrapped data keys."""

    async def newest_key(self) -> tuple[str, bytes] | None:
        """(key_id, wrapped) of the tenant's newest data key, if it has one."""
        ...

    async def get_key(self, key_id: str) -> bytes | None:
        """The wrapped key with this id, if the tenant has it."""
        ...

    async def add_key(self, key_id: str, wrapped: bytes) -> None:
        """Store a new wrapped key."""
        ...


@dataclass(frozen=True, slots=True)
class TenantKey:
    """One tenant's data key, ready to seal and open."""

    key_id: str
    """Stored beside each ciphertext so the right key is found to open it; empty = plaintext."""
    _aead: AESGCM | None

    def seal(self, aad: bytes, plaintext: bytes) -> bytes:
        """Encrypt plaintext bound to aad."""
        if self._aead is None:
            return plaintext
        nonce = os.urandom(_NONCE)
        return _FORMAT + nonce + self._aead.encrypt(nonce, plaintext, aad)

    def seal_many(self, items: list[tuple[bytes, bytes]]) -> list[bytes]:
        """seal() for a batch of (aad, plaintext): one random read for all the nonces."""
        if self._aead is None:
            return [plaintext for _, plaintext in items]
        nonces = os.urandom(_NONCE * len(items))
        encrypt = self._aead.encrypt
        out = []
        for i, (aad, plaintext) in enumerate(items):
            nonce = nonces[i * _NONCE : (i + 1) * _NONCE]
            out.append(b"".join((_FORMAT, nonce, encrypt(nonce, plaintext, aad))))
        return out

    def open(self, aad: bytes, blob: bytes) -> bytes:
        """Decrypt what seal produced for the same aad; UndecryptableData otherwise."""
        if self._aead is None:
            return blob
        if blob[:1] != _FORMAT:
            raise UndecryptableData("stored data could not be decrypted")
        try:
            return self._aead.decrypt(blob[1 : 1 + _NONCE], blob[1 + _NONCE :], aad)
        except InvalidTag:
            raise UndecryptableData("stored data could not be decrypted") from None


PLAINTEXT = TenantKey("", None)
"""The 'key' used when encryption is off (development and the bench baseline only)."""


class Envelope:
    """Hands out the current tenant's data keys, caching plain keys briefly in memory."""

    def __init__(
        self,
        provider: DataKeyProvider,
        keys: WrappedKeyStore,
        *,
        cache_ttl: float = 300.0,
        max_cached: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._provider = provider
        self._keys = keys
        self._ttl = cache_ttl
        self._max = max_cached
        self._clock = clock
        self._cache: OrderedDict[tuple[str, str], tuple[TenantKey, float]] = OrderedDict()
        self._current: dict[str, str] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    encrypts = True
    """Whether sealed data is really encrypted (False only for the plaintext baseline)."""

    async def current_key(self) -> TenantKey:
        """The key new data of the current tenant is sealed with (created on first use)."""
        tenant = require_tenant().tenant_id
        cached = self._cached(tenant, self._current.get(tenant, ""))
        if cached is not None:
            return cached
        async with self._lock(tenant):
            cached = self._cached(tenant, self._current.get(tenant, ""))
            if cached is not None:
                return cached
            newest = await self._keys.newest_key()
            if newest is None:
                key_id = "dk_" + secrets.token_hex(8)
                fresh = await self._call(self._provider.generate_data_key())
                await self._keys.add_key(key_id, fresh.wrapped)
                plaintext = fresh.plaintext
            else:
                key_id, wrapped = newest
                plaintext = await self._call(self._provider.unwrap_data_key(wrapped))
            self._current[tenant] = key_id
            return self._remember(tenant, key_id, plaintext)

    async def key(self, key_id: str) -> TenantKey:
        """The key that sealed data stored with `key_id`."""
        if not key_id:
            raise UndecryptableData("stored data is not encrypted but encryption is required")
        tenant = require_tenant().tenant_id
        cached = self._cached(tenant, key_id)
        if cached is not None:
            return cached
        async with self._lock(tenant):
            cached = self._cached(tenant, key_id)
            if cached is not None:
                return cached
            wrapped = await self._keys.get_key(key_id)
            if wrapped is None:
                raise UndecryptableData("stored data names a data key this tenant does not have")
            return self._remember(tenant, key_id, await self._call(self._provider.unwrap_data_key(wrapped)))

    async def keys(self, key_ids: set[str]) -> dict[str, TenantKey]:
        """The keys for a batch of rows, by id."""
        return {k: await self.key(k) for k in key_ids}

    def forget(self) -> None:
        """Drop every cached plain key (tests, and on shutdown)."""
        self._cache.clear()
        self._current.clear()

    def _cached(self, tenant: str, key_id: str) -> TenantKey | None:
        entry = self._cache.get((tenant, key_id))
        if entry is None:
            return None
        if entry[1] <= self._clock():
            del self._cache[(tenant, key_id)]
            return None
        return entry[0]

    def _remember(self, tenant: str, key_id: str, plaintext: bytes) -> TenantKey:
        key = TenantKey(key_id, AESGCM(plaintext))
        self._cache[(tenant, key_id)] = (key, self._clock() + self._ttl)
        while len(self._cache) > self._max:
            self._cache.popitem(last=False)
        return key

    def _lock(self, tenant: str) -> asyncio.Lock:
        return self._locks.setdefault(tenant, asyncio.Lock())

    @staticmethod
    async def _call(awaitable):
        try:
            return await awaitable
        except DataKeyUnavailable as exc:
            raise Unavailable(
                "the tenant's data key is unavailable", reason="DATA_KEY_UNAVAILABLE", retry_after=1.0
            ) from exc
        except DataKeyRejected as exc:
            raise UndecryptableData("stored data names a data key that does not unwrap") from exc


class PlaintextEnvelope:
    """No encryption: the bench baseline and explicit development setups; production config refuses it."""

    encrypts = False

    async def current_key(self) -> TenantKey:
        return PLAINTEXT

    async def key(self, key_id: str) -> TenantKey:
        if key_id:
            raise UndecryptableData("stored data is encrypted but this service runs without keys")
        return PLAINTEXT

    async def keys(self, key_ids: set[str]) -> dict[str, TenantKey]:
        return {k: await self.key(k) for k in key_ids}

    def forget(self) -> None:
        pass
