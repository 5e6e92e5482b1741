"""Encryption with the tenant's own key: Encrypt/Decrypt/GenerateDataKey/RotateKey/Rewrap, audited."""

from __future__ import annotations

from services.credentials.audit import AuditLog
from services.credentials.backend import DataKey, KeyBackend, TenantRef
from shared import errors
from shared.tenancy import require_tenant

MAX_PLAINTEXT_BYTES = 1024 * 1024


def _tenant() -> TenantRef:
    return TenantRef.of(require_tenant())


def _check_present(field: str, data: bytes) -> None:
    if not data:
        raise errors.InvalidArgument(
            f"{field} is required",
            reason="CIPHERTEXT_MISSING" if field == "ciphertext" else "PLAINTEXT_MISSING",
            violations={field: "must not be empty"},
        )


class KeyManager:
    """The keys half of the credentials service."""

    def __init__(self, backend: KeyBackend, audit: AuditLog) -> None:
        self._backend, self._audit = backend, audit

    async def encrypt(self, plaintext: bytes) -> tuple[bytes, int]:
        """Ciphertext under the tenant's latest key version."""
        async with self._audit.audited("encrypt") as note:
            _check_present("plaintext", plaintext)
            if len(plaintext) > MAX_PLAINTEXT_BYTES:
                raise errors.InvalidArgument(
                    "plaintext too large",
                    reason="PLAINTEXT_TOO_LARGE",
                    violations={"plaintext": f"at most {MAX_PLAINTEXT_BYTES} bytes"},
                )
            ciphertext, note.version = await self._backend.encrypt(_tenant(), plaintext)
        return ciphertext, note.version

    async def decrypt(self, ciphertext: bytes) -> bytes:
        """Plaintext, only for ciphertexts made with this tenant's key."""
        async with self._audit.audited("decrypt"):
            _check_present("ciphertext", ciphertext)
            plaintext = await self._backend.decrypt(_tenant(), ciphertext)
        return plaintext

    async def generate_data_key(self, bits: int = 0) -> DataKey:
        """A data key for envelope encryption (plaintext + wrapped)."""
        async with self._audit.audited("generate_data_key") as note:
            bits = bits or 256
            if bits not in (128, 256):
                raise errors.InvalidArgument(
                    "unsupported key size", reason="KEY_BITS_INVALID", violations={"bits": "128 or 256"}
                )
            key = await self._backend.generate_data_key(_tenant(), bits)
            note.version = key.key_version
        return key

    async def rotate_key(self) -> int:
        """A new key version; older versions keep decrypting."""
        async with self._audit.audited("rotate_key") as note:
            note.version = await self._backend.rotate_key(_tenant())
        return note.version

    async def rewrap(self, ciphertext: bytes) -> tuple[bytes, int]:
        """The ciphertext re-encrypted under the latest key version."""
        async with self._audit.audited("rewrap") as note:
            _check_present("ciphertext", ciphertext)
            out, note.version = await self._backend.rewrap(_tenant(), ciphertext)
        return out, note.version
