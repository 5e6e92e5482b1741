"""Where a tenant's data keys come from: the DataKeyProvider protocol and its local implementation.

A data key is a 256-bit AES key. The provider hands out a fresh one together with its wrapped
(encrypted) form, and unwraps a wrapped key later. Only the wrapped form is ever stored. Both
calls act for the tenant of the current request: a key wrapped for one tenant cannot be
unwrapped for another.
"""

from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from shared.tenancy import require_tenant

DATA_KEY_BYTES = 32
_NONCE = 12


@dataclass(frozen=True, slots=True)
class DataKey:
    """A fresh data key: the plain key (memory only) and its wrapped form (stored)."""

    plaintext: bytes
    """The AES-256 key; never persisted, never logged."""
    wrapped: bytes
    """The key encrypted under the tenant's key-encryption key."""


class DataKeyUnavailable(Exception):
    """The provider could not be reached or failed; retrying later may work."""


class DataKeyRejected(Exception):
    """The wrapped key does not unwrap for the current tenant (tampered, or another tenant's)."""


class DataKeyProvider(Protocol):
    """Generates and unwraps data keys for the current tenant."""

    async def generate_data_key(self) -> DataKey:
        """A new data key for the current tenant."""
        ...

    async def unwrap_data_key(self, wrapped: bytes) -> bytes:
        """The plain key of a key wrapped for the current tenant; DataKeyRejected otherwise."""
        ...


class LocalDataKeyProvider:
    """Wraps data keys with a local master key file (the embedded default and unit tests).

    The tenant id is bound into each wrap as associated data, so a wrapped key copied to
    another tenant does not unwrap.
    """

    def __init__(self, master_key: bytes):
        if len(master_key) != DATA_KEY_BYTES:
            raise ValueError("the master key must be 32 bytes")
        self._master = AESGCM(master_key)

    @classmethod
    def from_file(cls, path: pathlib.Path) -> LocalDataKeyProvider:
        """Load the master key from `path`, creating it (mode 0600) on first use."""
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(DATA_KEY_BYTES))
        return cls(path.read_bytes())

    async def generate_data_key(self) -> DataKey:
        plaintext = os.urandom(DATA_KEY_BYTES)
        nonce = os.urandom(_NONCE)
        return DataKey(plaintext, nonce + self._master.encrypt(nonce, plaintext, _wrap_aad()))

    async def unwrap_data_key(self, wrapped: bytes) -> bytes:
        try:
            return self._master.decrypt(wrapped[:_NONCE], wrapped[_NONCE:], _wrap_aad())
        except (InvalidTag, ValueError):
            raise DataKeyRejected("the data key does not unwrap for this tenant") from None


def _wrap_aad() -> bytes:
    return b"bulkhead.state.datakey:" + require_tenant().tenant_id.encode()
