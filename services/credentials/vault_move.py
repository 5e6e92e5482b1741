"""Moving a tenant's secrets and Transit key between OpenBao places: a silo tenant's own namespace and the root
namespace (a tier migration into or out of silo), or one region's OpenBao and another's (a region move).

The credentials service's MoveHook (shared.lifecycle): CopyTenant copies, VerifyTenant compares, ReleaseTenant
destroys the source, each with the service's admin token, never the tenant's.

- KV v2: every secret path under the tenant's prefix, every version in order, so version numbers stay the
  ones credentials' tables name: a live version's value is written as it is; a soft-deleted or destroyed
  one is written empty and then deleted or destroyed again at the target. A copy first removes whatever
  an earlier attempt left there (the target ends holding exactly the source's).
- Transit: its keys never leave OpenBao in plaintext by default, and a ciphertext is only as good as the key
  versions that made it. A tenant holds ciphertexts we cannot re-wrap (Encrypt's output is theirs), and
  state holds data keys wrapped by it; so instead of a new key and a re-wrap of only what we can reach,
  the key is carried whole: its config is set exportable with plaintext backup allowed (a one-way switch,
  on a key about to be destroyed at the source), backed up (every version) and restored at the target
  under the same name, where it keeps decrypting every ciphertext ever made. The backup travels from one
  OpenBao to the other through this process's memory only.
- Release: the source's key, values and policy are destroyed as a deletion destroys them (vault_purge.py),
  and a silo namespace the tenant left is deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging

import hvac.exceptions as vx

from services.credentials.backend import TenantRef
from services.credentials.regional import RegionalVault
from services.credentials.vault_backend import VaultBackend
from services.credentials.vault_purge import kv_paths, shred_vault
from shared.lifecycle import Placement, TableCount

log = logging.getLogger("bulkhead.credentials.move")

KV_TABLE = "openbao_kv"
"""The TableCount name of a tenant's KV versions (rows: versions; checksum over paths, versions, states, values)."""
KEY_TABLE = "openbao_transit_key"
"""The TableCount name of a tenant's Transit key (rows: key versions; checksum over versions and their times)."""


class VaultMover:
    """shared.lifecycle.MoveHook over the vault backend (one OpenBao, or one per region)."""

    def __init__(self, backend: VaultBackend | RegionalVault) -> None:
        self._backend = backend

    def _at(self, tenant_id: str, side: Placement) -> tuple[VaultBackend, TenantRef, str]:
        """The backend, the ref (its tier picks the namespace) and the store name of one side."""
        backend = self._backend.backends[side.region] if isinstance(self._backend, RegionalVault) else self._backend
        ref = TenantRef(tenant_id, side.tier.value)
        region = f"{side.region}/" if isinstance(self._backend, RegionalVault) else ""
        return backend, ref, f"openbao:{region}{backend.layout.namespace(ref) or 'root'}"

    def _same_place(self, tenant_id: str, source: Placement, target: Placement) -> bool:
        (a, ra, _), (b, rb, _) = self._at(tenant_id, source), self._at(tenant_id, target)
        return a is b and a.layout.namespace(ra) == b.layout.namespace(rb)

    async def copy(self, tenant_id: str, source: Placement, target: Placement) -> list[TableCount]:
        if self._same_place(tenant_id, source, target):
            return []
        src, src_ref, _ = self._at(tenant_id, source)
        dst, dst_ref, name = self._at(tenant_id, target)
        await asyncio.to_thread(_copy, src, src_ref, dst, dst_ref)
        log.info("moved tenant %s's secrets and Transit key in OpenBao (%s -> %s)", tenant_id, source, target)
        return await asyncio.to_thread(_inventory, dst, dst_ref, name)

    async def verify(
        self, tenant_id: str, source: Placement, target: Placement
    ) -> tuple[list[TableCount], list[TableCount]]:
        if self._same_place(tenant_id, source, target):
            return [], []
        out = []
        for side in (source, target):
            backend, ref, name = self._at(tenant_id, side)
            out.append(await asyncio.to_thread(_inventory, backend, ref, name))
        return out[0], out[1]

    async def release(self, tenant_id: str, left: Placement, current: Placement) -> list[TableCount]:
        if self._same_place(tenant_id, left, current):
            return []
        backend, ref, name = self._at(tenant_id, left)
        counts = await asyncio.to_thread(_inventory, backend, ref, name)
        await asyncio.to_thread(shred_vault, backend, ref)
        return [c for c in counts if c.rows]


def _copy(src: VaultBackend, src_ref: TenantRef, dst: VaultBackend, dst_ref: TenantRef) -> None:
    layout = src.layout
    s_admin = src.tokens.admin(layout.namespace(src_ref))
    dst.tokens.provision(dst_ref)  # namespace, mounts, a key (replaced below) and the tenant's policy there
    d_admin = dst.tokens.admin(dst.layout.namespace(dst_ref))
    key, transit = layout.key_name(src_ref), layout.transit_mount
    try:
        s_admin.secrets.transit.read_key(key, mount_point=transit)
        found = True
    except (vx.InvalidPath, vx.InvalidRequest):
        found = False  # never used at the source: the target's fresh key is all there is
    if found:
        s_admin.secrets.transit.update_key_configuration(
            key, exportable=True, allow_plaintext_backup=True, mount_point=transit
        )
        backup = s_admin.secrets.transit.backup_key(key, mount_point=transit)["data"]["backup"]
        d_admin.secrets.transit.restore_key(backup, name=key, force=True, mount_point=transit)
    dst.tokens.forget(dst_ref)  # its token is minted again against the restored key's policy

    kv, folder = layout.kv_mount, layout.prefix(src_ref) + "/"
    paths = kv_paths(s_admin, kv, folder)
    for stale in set(kv_paths(d_admin, kv, folder)) - set(paths):  # an earlier attempt's, since removed
        d_admin.secrets.kv.v2.delete_metadata_and_all_versions(stale, mount_point=kv)
    for path in paths:
        meta = s_admin.secrets.kv.v2.read_secret_metadata(path, mount_point=kv)["data"]
        with contextlib.suppress(vx.InvalidPath):
            d_admin.secrets.kv.v2.delete_metadata_and_all_versions(path, mount_point=kv)
        for version in range(1, int(meta["current_version"]) + 1):
            info = meta["versions"].get(str(version))
            gone = info is None or info["destroyed"]
            deleted = not gone and bool(info["deletion_time"])
            data = {"value": ""}
            if not gone and not deleted:
                data = s_admin.secrets.kv.v2.read_secret_version(
                    path, version=version, mount_point=kv, raise_on_deleted_version=True
                )["data"]["data"]
            d_admin.secrets.kv.v2.create_or_update_secret(path, secret=data, mount_point=kv)
            if gone:
                d_admin.secrets.kv.v2.destroy_secret_versions(path, versions=[version], mount_point=kv)
            elif deleted:
                d_admin.secrets.kv.v2.delete_secret_versions(path, versions=[version], mount_point=kv)


def _inventory(backend: VaultBackend, ref: TenantRef, store: str) -> list[TableCount]:
    """The tenant's KV versions and Transit key versions in one place (zero rows where there is nothing)."""
    layout = backend.layout
    ns = layout.namespace(ref)
    if ns is not None:
        try:
            listed = backend.tokens.admin(None).sys.list_namespaces()["data"]["keys"]
        except vx.InvalidPath:
            listed = []
        if f"{ns}/" not in listed and ns not in listed:
            return [TableCount(store, KV_TABLE, 0), TableCount(store, KEY_TABLE, 0)]
    admin = backend.tokens.admin(ns)
    kv = layout.kv_mount
    rows: list[list] = []
    try:
        paths = kv_paths(admin, kv, layout.prefix(ref) + "/")
    except vx.Forbidden:  # no KV mount (yet) in a namespace being made
        paths = []
    for path in sorted(paths):
        meta = admin.secrets.kv.v2.read_secret_metadata(path, mount_point=kv)["data"]
        for version in range(1, int(meta["current_version"]) + 1):
            info = meta["versions"].get(str(version))
            if info is None or info["destroyed"]:
                rows.append([path, version, "destroyed", ""])
            elif info["deletion_time"]:
                rows.append([path, version, "deleted", ""])
            else:
                value = admin.secrets.kv.v2.read_secret_version(
                    path, version=version, mount_point=kv, raise_on_deleted_version=True
                )["data"]["data"]
                rows.append(
                    [path, version, "live", hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()]
                )
    out = [_table(store, KV_TABLE, rows)]
    try:
        data = admin.secrets.transit.read_key(layout.key_name(ref), mount_point=layout.transit_mount)["data"]
        versions = [[v, str(t)] for v, t in sorted(data["keys"].items(), key=lambda kv_: int(kv_[0]))]
        out.append(
            _table(
                store,
                KEY_TABLE,
                [*versions, ["min_decryption_version", data["min_decryption_version"]]],
                count=len(versions),
            )
        )
    except (vx.InvalidPath, vx.InvalidRequest, vx.Forbidden):
        out.append(TableCount(store, KEY_TABLE, 0))
    return out


def _table(store: str, table: str, rows: list, *, count: int | None = None) -> TableCount:
    count = len(rows) if count is None else count
    if not count:
        return TableCount(store, table, 0)
    digest = hashlib.sha256(json.dumps(rows, separators=(",", ":"), default=str).encode()).hexdigest()
    return TableCount(store, table, count, digest)
