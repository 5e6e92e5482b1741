"""First start: the platform tenant and its operator key, written once to a 0600 file and printed once."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from services.identity.directory import OPERATOR_SCOPES, Directory
from shared.errors import NotFound
from shared.tenancy import PLATFORM_TENANT

OPERATOR_KEY_FILE = "operator.key"


async def ensure_platform_tenant(directory: Directory, data_dir: Path, *, announce=sys.stdout) -> str | None:
    """Create the platform tenant on first start; returns the new operator key, or None if it existed."""
    try:
        await directory.get_tenant(PLATFORM_TENANT)
        return None
    except NotFound:
        pass
    created = await directory.create_tenant("platform", "pooled", "local", tenant_id=PLATFORM_TENANT,
                                            admin_scopes=OPERATOR_SCOPES)
    path = data_dir / OPERATOR_KEY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(created.admin_api_key + "\n")
    # Printed straight to the terminal, never through logging (whose scrubber would redact it).
    print(f"bulkhead identity: created the platform operator key (shown once; also in {path}, mode 0600):\n"
          f"  {created.admin_api_key}", file=announce, flush=True)
    return created.admin_api_key
