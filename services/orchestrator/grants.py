"""Sealing of a run's delegated token while the run waits or runs, so a restarted replica can resume it.

The token is narrow (only the scopes the run needs), expires on its own, and is kept only in the
run's queue entry, encrypted under the orchestrator's key and bound to the run id: a copied blob
opens for no other run, and it is deleted when the run finishes.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM


class GrantSealer:
    """AES-GCM with the run id as associated data."""

    def __init__(self, key: bytes):
        if len(key) != 32:
            raise ValueError("grant key must be 32 bytes")
        self._aead = AESGCM(key)

    def seal(self, token: str, run_id: str) -> bytes:
        """Encrypt token for run_id."""
        nonce = secrets.token_bytes(12)
        return nonce + self._aead.encrypt(nonce, token.encode(), run_id.encode())

    def open(self, blob: bytes, run_id: str) -> str:
        """Decrypt a blob sealed for run_id (raises if it was sealed for another run or altered)."""
        return self._aead.decrypt(blob[:12], blob[12:], run_id.encode()).decode()


def load_or_create_key(path: Path) -> bytes:
    """A 32-byte key kept in a 0600 file (created on first use)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes()
    key = secrets.token_bytes(32)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return key
