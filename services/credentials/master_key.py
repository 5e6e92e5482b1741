"""Key files: 32 random bytes only the service user can read (the local backend's master key,
and the audit chain's HMAC key)."""

from __future__ import annotations

import os
import pathlib
import stat

from shared import errors

KEY_BYTES = 32


def load_or_create_master_key(path: pathlib.Path) -> bytes:
    """Read a key file, creating it (mode 0600, never overwritten) on first use.

    Refuses a key file that group or others can read: a leaked master key opens every tenant's
    data keys, a leaked audit key lets a forger rebuild the audit chain.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise errors.FailedPrecondition(
                f"master key file {path} has mode {mode:o}; it must be 0600", reason="MASTER_KEY_INSECURE"
            ) from None
        key = path.read_bytes()
        if len(key) != KEY_BYTES:
            raise errors.FailedPrecondition(
                f"master key file {path} is not {KEY_BYTES} bytes", reason="MASTER_KEY_INVALID"
            ) from None
        return key
    key = os.urandom(KEY_BYTES)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return key
