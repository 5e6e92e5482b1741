"""First start: the platform tenant and its operator key, written once to a 0600 file and printed once;
and a key file for each platform service principal (their keys are never printed).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from services.identity.directory import OPERATOR_SCOPES, Directory
from shared.errors import AlreadyExists, NotFound
from shared.tenancy import PLATFORM_TENANT, TenantContext, tenant_scope

log = logging.getLogger("bulkhead.identity")

OPERATOR_KEY_FILE = "operator.key"
VERIFY_SCOPE = "platform.identity.verify"
SERVICE_PRINCIPALS: dict[str, tuple[str, ...]] = {
    "credentials": (VERIFY_SCOPE,),
    "state": (VERIFY_SCOPE,),
    "orchestrator": (VERIFY_SCOPE,),
    "metering": (VERIFY_SCOPE,),
    "inference": (VERIFY_SCOPE, "platform.metering.record"),
}
"""Platform services that act without a tenant's token, and the only scopes each one's key holds:
every verifier polls ListRevokedTokens (revocations and suspended tenants, which name every
tenant); the inference proxy also delivers usage from its outbox after the calling tenant's token
is gone."""


def _write_private(path: Path, text: str) -> None:
    """Write a secret to a file only its owner can read (0600 from the start, never wider)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text + "\n")


async def ensure_platform_tenant(directory: Directory, data_dir: Path, *, announce=sys.stdout) -> str | None:
    """Create the platform tenant on first start; returns the new operator key, or None if it existed."""
    try:
        await directory.get_tenant(PLATFORM_TENANT)
        return None
    except NotFound:
        pass
    created = await directory.create_tenant(
        "platform", "pooled", "", tenant_id=PLATFORM_TENANT, admin_scopes=OPERATOR_SCOPES
    )
    path = data_dir / OPERATOR_KEY_FILE
    _write_private(path, created.admin_api_key)
    # Printed straight to the terminal, never through logging (whose scrubber would redact it).
    print(
        f"bulkhead identity: created the platform operator key (shown once; also in {path}, mode 0600):\n"
        f"  {created.admin_api_key}",
        file=announce,
        flush=True,
    )
    return created.admin_api_key


async def ensure_service_keys(directory: Directory, keys_dir: Path) -> list[str]:
    """Give each platform service principal a key file, once; returns the services that got one now.

    A missing file (first start, or deleted to rotate) gets a new key for the same principal.
    """
    made = []
    for service, scopes in SERVICE_PRINCIPALS.items():
        path = keys_dir / f"{service}.key"
        if path.exists():
            continue
        # identity's own act inside the platform tenant, holding exactly the scopes it grants.
        with tenant_scope(TenantContext(PLATFORM_TENANT, "identity", scopes=frozenset(scopes))):
            principal_id = await _service_principal(directory, f"svc-{service}", list(scopes))
            _, key = await directory.create_api_key(principal_id, list(scopes), f"{service} service key")
        _write_private(path, key)
        log.info("created the %s service key in %s (mode 0600)", service, path)
        made.append(service)
    return made


async def _service_principal(directory: Directory, name: str, scopes: list[str]) -> str:
    try:
        return (await directory.create_principal("service_account", name, scopes)).id
    except AlreadyExists:
        token = ""
        while True:
            page = await directory.list_principals(200, token)
            for row in page.items:
                if row.display_name == name:
                    return row.id
            token = page.next_page_token
            if not token:
                raise
