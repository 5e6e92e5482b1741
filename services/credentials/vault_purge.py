"""Crypto-shredding a deleted tenant in OpenBao (purge.py's vault half): its Transit key, KV values and policy,
then for a silo tenant its whole namespace, with the service's admin token. Every step tolerates "already gone".

A module of its own so that a process on the local backend never loads hvac and requests.
"""

from __future__ import annotations

import contextlib
import logging

import hvac
import hvac.exceptions as vx

from services.credentials.backend import TenantRef
from services.credentials.vault_backend import VaultBackend
from shared.lifecycle import HookResult

log = logging.getLogger("bulkhead.credentials.purge")


def shred_vault(backend: VaultBackend, ref: TenantRef) -> HookResult:
    """Transit key, KV values, policy, then (silo) the namespace, with the service's admin token."""
    layout = backend.layout
    ns = layout.namespace(ref)
    admin = backend.tokens.admin(ns)
    key = layout.key_name(ref)
    where = f"openbao-namespace:{ns}" if ns else "openbao"
    backend.tokens.forget(ref)  # no cached tenant token may outlive its policy
    if _namespace_gone(backend, ns):
        return HookResult(destroyed_keys=[(f"transit:{key}", where)], actions=[("secrets_destroyed", 0)])
    try:
        admin.secrets.transit.update_key_configuration(key, deletion_allowed=True, mount_point=layout.transit_mount)
        admin.secrets.transit.delete_key(key, mount_point=layout.transit_mount)
    except (vx.InvalidPath, vx.InvalidRequest):
        pass  # no such key (never used, or destroyed by an earlier attempt)
    paths = kv_paths(admin, layout.kv_mount, layout.prefix(ref) + "/")
    for path in paths:
        admin.secrets.kv.v2.delete_metadata_and_all_versions(path, mount_point=layout.kv_mount)
    admin.sys.delete_policy(layout.policy_name(ref))
    if ns is not None:
        _delete_namespace(backend, admin, ns)
    log.info("shredded tenant %s in OpenBao (%d secrets)", ref.tenant_id, len(paths))
    return HookResult(destroyed_keys=[(f"transit:{key}", where)], actions=[("secrets_destroyed", len(paths))])


def kv_paths(admin: hvac.Client, mount: str, folder: str) -> list[str]:
    """Every secret path under a KV v2 folder (names may hold '/')."""
    try:
        keys = admin.secrets.kv.v2.list_secrets(folder, mount_point=mount)["data"]["keys"]
    except vx.InvalidPath:
        return []
    out: list[str] = []
    for key in keys:
        out.extend(kv_paths(admin, mount, folder + key) if key.endswith("/") else [folder + key])
    return out


def _namespace_gone(backend: VaultBackend, ns: str | None) -> bool:
    if ns is None:
        return False
    try:
        listed = backend.tokens.admin(None).sys.list_namespaces()["data"]["keys"]
    except vx.InvalidPath:  # no namespace at all
        return True
    return f"{ns}/" not in listed and ns not in listed


def _delete_namespace(backend: VaultBackend, admin: hvac.Client, ns: str) -> None:
    """Unmount the tenant's engines (their storage goes with them), then delete the namespace."""
    for mount in (backend.layout.kv_mount, backend.layout.transit_mount):
        with contextlib.suppress(vx.InvalidPath):
            admin.sys.disable_secrets_engine(mount)
    with contextlib.suppress(vx.InvalidPath):
        backend.tokens.admin(None).sys.delete_namespace(ns)
