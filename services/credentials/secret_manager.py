"""Secrets: the rules of PutSecret/GetSecret/... over a backend, the metadata tables and the audit.

Order of work is chosen so that a failing backend leaves nothing half-written: the value is
written first and metadata only after it succeeded; deletions touch the backend before the
metadata. Every call is audited, including refusals.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.exc import IntegrityError

from services.credentials import store
from services.credentials.audit import AuditLog
from services.credentials.backend import SecretBackend, TenantRef
from services.credentials.rotation import RotationRequest, RotatorRegistry
from shared import errors
from shared.cache import TenantCache
from shared.db import Database
from shared.logs import register_secret
from shared.tenancy import require_tenant

log = logging.getLogger("bulkhead.credentials.secrets")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
MAX_VALUE_BYTES = 64 * 1024
MIN_ROTATION_SECONDS = 60
MAX_PERIOD_SECONDS = 100 * 366 * 24 * 3600
"""The longest rotation or grace period: a century. Periods become microsecond timestamps, and one of
protobuf's longest Durations would not fit in the database's 64-bit integers."""


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """One version's metadata."""

    version: int
    state: str
    created_us: int
    expire_us: int | None
    created_by: str
    origin: str


@dataclass(frozen=True, slots=True)
class _ReadView:
    """What GetSecret needs to know about a secret, cached briefly."""

    current_version: int
    versions: dict[int, tuple[str, int | None, int]]  # version -> (state, expire_us, created_us)


@dataclass(frozen=True, slots=True)
class SecretInfo:
    """A secret's metadata as the API shows it (never a value)."""

    name: str
    description: str
    current_version: int
    rotation_period_s: int | None
    rotator: str
    next_rotation_us: int | None
    grace_period_s: int
    created_us: int
    updated_us: int
    deleted_us: int | None
    last_access_us: int | None = None
    versions: tuple[VersionInfo, ...] = field(default=())

    @classmethod
    def of(
        cls,
        row: store.SecretRow,
        versions: Sequence[store.VersionRow] = (),
        last_access_us: int | None = None,
    ) -> SecretInfo:
        """Snapshot a row (inside its session)."""
        return cls(
            row.name,
            row.description,
            row.current_version,
            row.rotation_period_s,
            row.rotator,
            row.next_rotation_us,
            row.grace_period_s,
            row.created_us,
            row.updated_us,
            row.deleted_us,
            last_access_us,
            tuple(VersionInfo(v.version, v.state, v.created_us, v.expire_us, v.created_by, v.origin) for v in versions),
        )


def check_name(name: str) -> None:
    """Secret names become backend paths: a strict pattern keeps them from escaping the tenant's prefix."""
    if not _NAME.match(name or ""):
        raise errors.InvalidArgument(
            "invalid secret name",
            reason="SECRET_NAME_INVALID",
            violations={"name": "1-128 characters: letters, digits, '.', '_' and '-', starting with a letter or digit"},
        )


def _not_found() -> errors.NotFound:
    # The same words for "never existed", "another tenant's" and "deleted": nothing leaks.
    return errors.NotFound("secret not found", reason="SECRET_NOT_FOUND")


def _register(value: bytes) -> None:
    """Tell the log scrubber about a value so it is redacted if it ever reaches a log line."""
    try:
        text = value.decode()
    except UnicodeDecodeError:
        return
    if len(text) >= 4:
        register_secret(text)


class SecretManager:
    """The secrets half of the credentials service."""

    def __init__(
        self,
        db: Database,
        backend: SecretBackend,
        audit: AuditLog,
        rotators: RotatorRegistry,
        *,
        default_grace_seconds: int = 86400,
        cache_seconds: float = 1.0,
        cache_values: bool = False,
    ) -> None:
        """cache_seconds bounds how stale another replica's change can look; cache_values also keeps
        decrypted values in memory (local backend only: the vault backend reads through OpenBao every
        time, so OpenBao's policy is always applied). A cached value is keyed by version and creation
        time and served only while the metadata says that version is readable."""
        self._db, self._backend, self._audit, self._rotators = db, backend, audit, rotators
        self._default_grace = default_grace_seconds
        # Writes in this process invalidate at once; a generation stops a read that started before a
        # write from caching what it saw. Other replicas' changes are seen after the ttl.
        self._views: TenantCache[_ReadView | None] = TenantCache(cache_seconds)  # (tenant, name)
        self._values: TenantCache[bytes] | None = (  # (tenant, (name, version, created))
            TenantCache(cache_seconds * 30) if cache_values else None
        )

    def _forget(self, name: str) -> None:
        """Drop cached reads of a secret this process is changing (and detach any load in flight,
        so later readers do not join a load that began before the change)."""
        self._views.invalidate(require_tenant().tenant_id, name)

    # -- writes ---------------------------------------------------------------------------------

    async def put(
        self,
        name: str,
        value: bytes,
        *,
        cas: int | None = None,
        description: str = "",
        rotation_period_s: int | None = None,
        rotator: str = "",
        grace_period_s: int | None = None,
    ) -> SecretInfo:
        """Write a new version (creating the secret on first write)."""
        async with self._audit.audited("put", name) as note:
            check_name(name)
            violations = {}
            if len(value) > MAX_VALUE_BYTES:
                violations["value"] = f"at most {MAX_VALUE_BYTES} bytes"
            if cas is not None and cas < 0:
                violations["cas"] = "must be 0 or more"
            if rotation_period_s is not None and 0 < rotation_period_s < MIN_ROTATION_SECONDS:
                violations["rotation_period"] = f"0 (off) or at least {MIN_ROTATION_SECONDS} seconds"
            if rotation_period_s is not None and rotation_period_s > MAX_PERIOD_SECONDS:
                violations["rotation_period"] = f"at most {MAX_PERIOD_SECONDS} seconds (a century)"
            if grace_period_s is not None and grace_period_s < 0:
                violations["grace_period"] = "must not be negative"
            if grace_period_s is not None and grace_period_s > MAX_PERIOD_SECONDS:
                violations["grace_period"] = f"at most {MAX_PERIOD_SECONDS} seconds (a century)"
            if len(description) > 1024:
                violations["description"] = "at most 1024 characters"
            if violations:
                raise errors.InvalidArgument("invalid secret", reason="SECRET_INVALID", violations=violations)
            if rotator:
                self._rotators.get(rotator)
            _register(value)
            async with self._db.session() as s:
                existing = await store.get_secret(s, name)
                if existing is not None and existing.deleted_us is not None:
                    raise errors.FailedPrecondition(
                        "the secret is deleted; destroy it before reusing its name", reason="SECRET_DELETED"
                    )
            tenant = TenantRef.of(require_tenant())
            version = await self._write(tenant, name, value, cas)
            note.version = version
            return await self._record_written(
                tenant,
                name,
                version,
                origin="put",
                description=description,
                rotation_period_s=rotation_period_s,
                rotator=rotator,
                grace_period_s=grace_period_s,
            )

    async def _write(self, tenant: TenantRef, name: str, value: bytes, cas: int | None) -> int:
        """backend.write. `cas` names a version of the metadata's; the backend may also count numbers a refused
        write used up and destroyed (_undo_write), so a mismatch is tried once more past those."""
        try:
            return await self._backend.write(tenant, name, value, cas=cas)
        except errors.Aborted as exc:
            if cas is None or exc.reason != "CAS_MISMATCH":
                raise
            later = await self._backend.versions_after(tenant, name, cas)
            if not later or not all(later.values()):  # a live version after cas: a real mismatch
                raise
            return await self._backend.write(tenant, name, value, cas=max(later))

    async def _record_written(self, tenant: TenantRef, name: str, version: int, **metadata: Any) -> SecretInfo:
        """_record_version for a version the backend has just written. When its metadata cannot be written,
        the version is destroyed in the backend again: a refused PutSecret or RotateSecret leaves no value
        behind that no metadata knows of (and that a later DestroySecret of the name would be the only way
        to reach)."""
        try:
            return await self._record_version(name, version, **metadata)
        except Exception:
            await self._undo_write(tenant, name, version)
            raise

    async def _undo_write(self, tenant: TenantRef, name: str, version: int) -> None:
        """Destroy `version` in the backend unless its metadata landed after all (the error came after the
        commit, or the commit's answer was lost): a recorded version is never destroyed here."""
        try:
            async with self._db.session() as s:
                if any(v.version == version for v in await store.versions_of(s, name)):
                    return
            await self._backend.destroy(tenant, name, [version])
        except Exception as exc:  # noqa: BLE001 - the caller's error is the one raised; this one is logged
            log.warning(
                "secret %r: version %d was written to the %s backend but neither recorded nor destroyed (%s); "
                "no metadata lists it, and DestroySecret of the name removes it",
                name,
                version,
                self._backend.name,
                type(exc).__name__,
            )

    async def _record_version(
        self,
        name: str,
        version: int,
        *,
        origin: str,
        description: str = "",
        rotation_period_s: int | None = None,
        rotator: str = "",
        grace_period_s: int | None = None,
    ) -> SecretInfo:
        """Metadata for a version the backend has just written (retried once on a create race)."""
        ctx = require_tenant()
        self._forget(name)
        for attempt in (1, 2):
            try:
                async with self._db.session() as s:
                    now = store.now_us()
                    row = await store.get_secret(s, name)
                    if row is None:
                        row = store.SecretRow(
                            name=name,
                            description="",
                            current_version=0,
                            rotation_period_s=None,
                            rotator="random",
                            grace_period_s=self._default_grace,
                            created_us=now,
                            updated_us=now,
                        )
                        s.add(row)
                    if description:
                        row.description = description
                    if rotator:
                        row.rotator = rotator
                    if grace_period_s is not None:
                        row.grace_period_s = grace_period_s
                    if rotation_period_s is not None:
                        row.rotation_period_s = rotation_period_s or None
                    versions = await store.versions_of(s, name)
                    if any(v.version == version for v in versions):
                        # The backend handed out a number we already know: its history was reset
                        # (an OpenBao restored empty). Earlier versions are gone there; say so here.
                        for v in versions:
                            await s.delete(v)
                        await s.flush()
                        versions, row.current_version = [], 0
                    if version > row.current_version:
                        expire = now + row.grace_period_s * 1_000_000 if row.grace_period_s else None
                        for v in versions:
                            if v.state == "current":
                                v.state, v.expire_us = "previous", expire
                        row.current_version = version
                    new = store.VersionRow(
                        name=name,
                        version=version,
                        created_us=now,
                        created_by=ctx.principal_id,
                        origin=origin,
                        expire_us=None,
                        state="current" if row.current_version == version else "previous",
                    )
                    s.add(new)
                    versions.append(new)
                    row.updated_us = now
                    row.next_rotation_us = now + row.rotation_period_s * 1_000_000 if row.rotation_period_s else None
                    due = self._due(row, versions)
                    info = SecretInfo.of(row, [])
                self._forget(name)  # again after commit: a read may have cached the old state meanwhile
                await self._schedule(name, due)
                return info
            except IntegrityError:
                if attempt == 2:
                    raise errors.Aborted("the secret changed concurrently; retry", reason="CONCURRENT_UPDATE") from None
        raise AssertionError("unreachable")

    @staticmethod
    def _due(row: store.SecretRow, versions: list[store.VersionRow]) -> tuple[int | None, int | None]:
        """When the secret next needs rotating and when its oldest previous version expires."""
        if row.deleted_us is not None:
            return None, None
        expiries = [v.expire_us for v in versions if v.state == "previous" and v.expire_us is not None]
        return row.next_rotation_us, min(expiries) if expiries else None

    async def _schedule(self, name: str, due: tuple[int | None, int | None]) -> None:
        """Record the background work in the platform schedule (its region's main database, whatever the tier)."""
        ctx = require_tenant()
        async with self._db.system_session(await self._db.region_of(ctx.tenant_id)) as s:
            for kind, due_us in zip(("rotate", "expire"), due, strict=True):
                await store.set_schedule(s, tenant_id=ctx.tenant_id, tier=ctx.tier, name=name, kind=kind, due_us=due_us)

    async def rotate(self, name: str) -> SecretInfo:
        """Make a new version through the secret's rotator (check-and-set on the current version)."""
        async with self._audit.audited("rotate", name) as note:
            check_name(name)
            async with self._db.session() as s:
                row = await store.get_secret(s, name)
                if row is None or row.deleted_us is not None:
                    raise _not_found()
                rotator_name, current = row.rotator, row.current_version
            rotator = self._rotators.get(rotator_name)
            tenant = TenantRef.of(require_tenant())
            value = await rotator.new_value(RotationRequest(tenant.tenant_id, name, current))
            _register(value)
            note.version = await self._write(tenant, name, value, current)
            return await self._record_written(tenant, name, note.version, origin=f"rotate:{rotator_name}")

    async def delete(self, name: str) -> SecretInfo:
        """Soft-delete: values stay in the backend, unreadable, until DestroySecret."""
        async with self._audit.audited("delete", name):
            check_name(name)
            async with self._db.session() as s:
                row = await store.get_secret(s, name)
                if row is None or row.deleted_us is not None:
                    raise _not_found()
                live = [v.version for v in await store.versions_of(s, name) if v.state != "destroyed"]
            self._forget(name)
            await self._backend.delete(TenantRef.of(require_tenant()), name, live)
            async with self._db.session() as s:
                row = await store.get_secret(s, name)
                if row is None:
                    raise _not_found()
                row.deleted_us = store.now_us()
                versions = await store.versions_of(s, name)
                for v in versions:
                    if v.state != "destroyed":
                        v.state = "deleted"
                due, info = self._due(row, versions), SecretInfo.of(row, versions)
            self._forget(name)
            await self._schedule(name, due)
            return info

    async def destroy(self, name: str) -> int:
        """Destroy every version and forget the secret; returns how many versions there were."""
        async with self._audit.audited("destroy", name):
            check_name(name)
            async with self._db.session() as s:
                if await store.get_secret(s, name) is None:
                    raise _not_found()
                count = sum(1 for v in await store.versions_of(s, name) if v.state != "destroyed")
            self._forget(name)
            await self._backend.purge(TenantRef.of(require_tenant()), name)
            async with self._db.session() as s:
                await store.delete_secret_rows(s, name)
            self._forget(name)
            await self._schedule(name, (None, None))
            return count

    async def expire_versions(self, name: str) -> list[int]:
        """Destroy previous versions whose grace period is over (the scheduler calls this)."""
        async with self._audit.audited("expire", name) as note:
            now = store.now_us()
            async with self._db.session() as s:
                due = [
                    v.version
                    for v in await store.versions_of(s, name)
                    if v.state == "previous" and v.expire_us is not None and v.expire_us <= now
                ]
            if due:
                note.version = max(due)
                self._forget(name)
                await self._backend.destroy(TenantRef.of(require_tenant()), name, due)
            async with self._db.session() as s:
                row = await store.get_secret(s, name)
                versions = await store.versions_of(s, name)
                for v in versions:
                    if v.version in due:
                        v.state, v.expire_us = "destroyed", None
                next_due = self._due(row, versions) if row is not None else (None, None)
            self._forget(name)
            await self._schedule(name, next_due)
            return due

    # -- reads ----------------------------------------------------------------------------------

    async def get(self, name: str, version: int = 0) -> tuple[int, bytes]:
        """A value: the current version, or a previous one still inside its grace period."""
        async with self._audit.audited("get", name) as note:
            check_name(name)
            if version < 0:
                raise errors.InvalidArgument(
                    "invalid version",
                    reason="INVALID_VERSION",
                    violations={"version": "0 (current) or a version number"},
                )
            ctx = require_tenant()
            view = await self._read_view(ctx.tenant_id, name)
            if view is None:
                raise _not_found()
            want = version or view.current_version
            state, expire_us, created_us = view.versions.get(want, ("missing", None, 0))
            if not (state == "current" or (state == "previous" and (expire_us is None or expire_us > store.now_us()))):
                raise errors.NotFound(
                    "that secret version does not exist or has expired", reason="SECRET_VERSION_NOT_FOUND"
                )
            note.version = want
            key = (ctx.tenant_id, name, want, created_us)
            hit, value = self._values.lookup(key[0], key[1:]) if self._values is not None else (False, None)
            if not hit or value is None:
                self._audit.allow_early(note, "get")  # authorized: audit while the value is fetched
                value = await self._read_value(key, TenantRef.of(ctx))
        return want, value  # audited() has committed the event by now

    async def _read_view(self, tenant_id: str, name: str) -> _ReadView | None:
        """The secret's readable versions (None if it does not exist or is deleted), cached briefly.

        Concurrent misses for one secret share a single load instead of all hitting the database.
        """
        return await self._views.load(tenant_id, lambda: self._load_view(name), key=name)

    async def _load_view(self, name: str) -> _ReadView | None:
        async with self._db.session() as s:
            row = await store.get_secret(s, name)
            if row is None or row.deleted_us is not None:
                return None
            return _ReadView(
                row.current_version,
                {v.version: (v.state, v.expire_us, v.created_us) for v in await store.versions_of(s, name)},
            )

    async def _read_value(self, key: tuple[str, str, int, int], tenant: TenantRef) -> bytes:
        """The value from the backend, remembered in the value cache when there is one (local backend).

        key is (tenant, name, version, the version's creation time): a destroyed and re-created
        secret never serves the old value.
        """
        generation = self._values.generation(key[0], key[1:]) if self._values is not None else 0
        stored = await self._backend.read(tenant, key[1], key[2])
        _register(stored.value)
        if self._values is not None:
            self._values.put(key[0], stored.value, generation=generation, key=key[1:])
        return stored.value

    async def describe(self, name: str) -> SecretInfo:
        """Metadata with versions and last access."""
        async with self._audit.audited("describe", name):
            check_name(name)
            async with self._db.session() as s:
                row = await store.get_secret(s, name)
                if row is None:
                    raise _not_found()
                info = SecretInfo.of(row, await store.versions_of(s, name))
            return dataclasses.replace(info, last_access_us=await self._audit.last_access_us(name))

    async def list(self, *, after: str, limit: int, show_deleted: bool) -> list[SecretInfo]:
        """A page of metadata, by name."""
        async with self._audit.audited("list"):
            async with self._db.session() as s:
                return [
                    SecretInfo.of(r)
                    for r in await store.list_secrets(s, after=after, limit=limit, show_deleted=show_deleted)
                ]
