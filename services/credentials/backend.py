"""The two interfaces a secrets backend implements (values and keys), shared by `local` and `vault`.

Backends hold values and keys only; metadata and audit live in the service's own tables. They
raise shared.errors exceptions with precise reasons, and never put a value in a message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from shared import errors
from shared.ids import is_tenant_id
from shared.tenancy import TenantContext


@dataclass(frozen=True, slots=True)
class TenantRef:
    """Which tenant a backend call is for, and how strongly it is separated."""

    tenant_id: str
    """The tenant; checked against a strict pattern because it becomes part of paths and policies."""
    tier: str = "pooled"
    """pooled, bridge or silo (silo gets its own OpenBao namespace)."""

    @classmethod
    def of(cls, ctx: TenantContext) -> TenantRef:
        """The ref of the request's verified tenant."""
        if not is_tenant_id(ctx.tenant_id):
            raise errors.InvalidArgument("tenant id has an unexpected shape", reason=errors.Reason.INVALID_TENANT_ID)
        return cls(ctx.tenant_id, ctx.tier or "pooled")


@dataclass(frozen=True, slots=True)
class StoredValue:
    """One version of a secret as read from a backend."""

    version: int
    """The backend's version number."""
    value: bytes = b""
    """The plaintext value (never logged: the manager registers it with the log scrubber)."""


@dataclass(frozen=True, slots=True)
class DataKey:
    """A fresh data key for envelope encryption."""

    plaintext: bytes
    """The key itself: use, never store."""
    wrapped: bytes
    """The key encrypted by the tenant's key: store; Decrypt opens it."""
    key_version: int
    """The tenant key version that wrapped it."""


class SecretBackend(Protocol):
    """Versioned key/value storage with check-and-set, soft delete and destroy (KV v2 semantics)."""

    name: str

    async def write(self, tenant: TenantRef, name: str, value: bytes, *, cas: int | None) -> int:
        """Store a new version and return its number; cas=N requires the current version to be N
        (0: the secret must not exist) else raises Aborted(reason="CAS_MISMATCH")."""
        ...

    async def read(self, tenant: TenantRef, name: str, version: int | None = None) -> StoredValue:
        """A version (None: the latest); NotFound when it does not exist or was deleted/destroyed."""
        ...

    async def delete(self, tenant: TenantRef, name: str, versions: list[int]) -> None:
        """Soft-delete versions (they stop being readable; destroy removes them for good)."""
        ...

    async def destroy(self, tenant: TenantRef, name: str, versions: list[int]) -> None:
        """Destroy versions for good."""
        ...

    async def purge(self, tenant: TenantRef, name: str) -> None:
        """Destroy every version and forget the secret (a later write starts again at 1)."""
        ...

    async def versions_after(self, tenant: TenantRef, name: str, version: int) -> dict[int, bool]:
        """The versions after `version`, each with whether it is destroyed."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


class KeyBackend(Protocol):
    """Encryption with a per-tenant key that has versions (Transit semantics)."""

    async def encrypt(self, tenant: TenantRef, plaintext: bytes) -> tuple[bytes, int]:
        """Ciphertext and the key version used."""
        ...

    async def decrypt(self, tenant: TenantRef, ciphertext: bytes) -> bytes:
        """Plaintext; InvalidArgument(reason="DECRYPTION_FAILED") for anything not this tenant's."""
        ...

    async def generate_data_key(self, tenant: TenantRef, bits: int) -> DataKey:
        """A fresh data key, plaintext and wrapped."""
        ...

    async def rotate_key(self, tenant: TenantRef) -> int:
        """Add a key version and return the latest."""
        ...

    async def rewrap(self, tenant: TenantRef, ciphertext: bytes) -> tuple[bytes, int]:
        """Re-encrypt under the latest key version without exposing the plaintext."""
        ...


def decryption_failed() -> errors.InvalidArgument:
    """The one error for a ciphertext this tenant cannot open: garbage and foreign data look alike."""
    return errors.InvalidArgument(
        "the ciphertext cannot be decrypted with this tenant's key",
        reason="DECRYPTION_FAILED",
        violations={"ciphertext": "not decryptable by this tenant"},
    )


def cas_mismatch(expected: int, current: int | None = None) -> errors.Aborted:
    """The error for a failed check-and-set."""
    where = "does not exist yet" if current == 0 else (f"is at version {current}" if current else "changed")
    return errors.Aborted(
        f"check-and-set failed: expected version {expected} but the secret {where}",
        reason="CAS_MISMATCH",
        metadata={"expected_version": str(expected)},
    )
