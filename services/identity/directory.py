"""Tenants, principals and API keys: who exists, and what each may be granted."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, replace
from datetime import datetime

from sqlalchemy import select

from services.identity.credentials import make_api_key, new_id
from services.identity.signing import utcnow
from services.identity.store import ApiKeyRow, PrincipalRow, TenantRow
from shared import paging
from shared.config import DEFAULT_REGION
from shared.db import Database
from shared.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, clip
from shared.paging import Page, page_size
from shared.retention import Policy, effective
from shared.tenancy import (
    OPERATOR_SCOPE,
    PLATFORM_TENANT,
    TIERS,
    TenantContext,
    require_tenant,
    scope_matches,
    tenant_scope,
)

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")
_SCOPE_RE = re.compile(r"^(\*|[a-z][a-z0-9_]*(\.[a-z0-9_]+)*(\.\*)?)$")
PRINCIPAL_KINDS = ("user", "service_account", "agent")
ADMIN_SCOPES = ("*",)
OPERATOR_SCOPES = (OPERATOR_SCOPE, "*")


def covered(wanted: Iterable[str], granted: Iterable[str]) -> bool:
    """Whether every wanted scope is covered by some granted scope."""
    granted = tuple(granted)
    return all(any(scope_matches(g, w) for g in granted) for w in wanted)


def validate_scopes(scopes: Iterable[str], *, field: str, tenant_id: str) -> list[str]:
    """Scopes well formed, and platform.* only inside the platform tenant."""
    out = []
    for scope in scopes:
        if not _SCOPE_RE.match(scope):
            # Clipped after repr: a long or unprintable scope echoed whole overflowed the 1 KB error details.
            raise InvalidArgument(
                f"malformed scope {clip(repr(scope), 100)}",
                violations={field: "scopes look like 'service.resource.verb'"},
            )
        if scope.startswith("platform.") and tenant_id != PLATFORM_TENANT:
            raise PermissionDenied("platform scopes are only for platform operators", reason="PLATFORM_SCOPE")
        out.append(scope)
    return sorted(set(out))


def pooled(ctx: TenantContext) -> TenantContext:
    """identity is the control plane: its own rows stay in pooled tables whatever the tenant's tier."""
    return replace(ctx, tier="pooled") if ctx.tier != "pooled" else ctx


def acting_as(tenant_id: str) -> TenantContext:
    """A context for identity's own work inside one tenant's rows (no scopes: it grants nothing)."""
    return TenantContext(tenant_id=tenant_id, principal_id="identity", tier="pooled")


@dataclass(frozen=True)
class NewTenant:
    """What CreateTenant hands back: the admin key is shown only once."""

    tenant: TenantRow
    admin: PrincipalRow
    admin_api_key: str


class Directory:
    """Tenants, principals and API keys in identity's database."""

    def __init__(self, db: Database, *, regions: tuple[str, ...] = (DEFAULT_REGION,)):
        """regions: the deployment's data-residency regions, the default first (shared.config.regions)."""
        self._db = db
        self._regions = tuple(regions) or (DEFAULT_REGION,)

    # Tenants -------------------------------------------------------------------------------
    async def create_tenant(
        self,
        name: str,
        tier: str,
        region: str,
        *,
        tenant_id: str | None = None,
        admin_scopes: tuple[str, ...] = ADMIN_SCOPES,
    ) -> NewTenant:
        """A tenant, its admin principal and the admin's first API key, in one transaction."""
        if not _NAME_RE.match(name or ""):
            raise InvalidArgument(
                "tenant name must be 3-63 lower-case letters, digits or '-'",
                violations={"name": "3-63 of [a-z0-9-], starting and ending alphanumeric"},
            )
        if tier not in TIERS:
            raise InvalidArgument(f"unknown tier {tier!r}", violations={"tier": "pooled, bridge or silo"})
        region = region or self._regions[0]
        if region not in self._regions:
            # Where a tenant's rows may live is a legal promise: never file them under a region no
            # database serves (or a default the customer did not ask for).
            known = ", ".join(self._regions)
            raise InvalidArgument(
                f"unknown region {clip(repr(region), 40)}: this deployment's regions are {known}",
                reason="UNKNOWN_REGION",
                violations={"region": f"one of: {known}"},
            )
        tid = tenant_id or new_id("t")
        async with self._db.system_session() as s:
            if (await s.execute(select(TenantRow.id).where(TenantRow.name == name))).first():
                raise AlreadyExists(f"a tenant named {name!r} exists", reason="TENANT_EXISTS")
        with tenant_scope(acting_as(tid)):
            async with self._db.session() as s:
                now = utcnow()
                tenant = TenantRow(id=tid, name=name, tier=tier, region=region, status="active", created_at=now)
                admin = PrincipalRow(
                    id=new_id("p"),
                    kind="user",
                    display_name="admin",
                    scopes=list(admin_scopes),
                    disabled=False,
                    created_at=now,
                )
                key_id = new_id("k")
                whole, prefix, digest = make_api_key(tid, key_id)
                key = ApiKeyRow(
                    id=key_id,
                    principal_id=admin.id,
                    prefix=prefix,
                    secret_hash=digest,
                    scopes=list(admin_scopes),
                    display_name="admin (created with tenant)",
                    created_at=now,
                )
                s.add(tenant)
                await s.flush()
                s.add_all([admin, key])
        return NewTenant(tenant=tenant, admin=admin, admin_api_key=whole)

    async def get_tenant(self, tenant_id: str) -> TenantRow:
        """A tenant by id; callers decide who may ask."""
        async with self._db.system_session() as s:
            row = await s.get(TenantRow, tenant_id)
        if row is None:
            raise NotFound("tenant not found", reason="TENANT_NOT_FOUND")
        return row

    async def list_tenants(self, size: int, token: str) -> Page[TenantRow]:
        """Tenants oldest first, a page at a time."""
        limit = page_size(size)
        after = paging.decode(token)
        async with self._db.system_session() as s:
            q = _after(
                select(TenantRow).order_by(TenantRow.created_at, TenantRow.id).limit(limit + 1), TenantRow, after
            )
            rows = list((await s.execute(q)).scalars())
        return paging.keyset(rows, limit, lambda r: {"t": r.created_at, "id": r.id})

    async def set_tenant_status(self, tenant_id: str, status: str) -> TenantRow:
        """Suspend or reactivate a tenant (the platform tenant cannot be suspended)."""
        if status not in ("active", "suspended"):
            raise InvalidArgument("status must be active or suspended", violations={"status": "ACTIVE or SUSPENDED"})
        if tenant_id == PLATFORM_TENANT:
            raise FailedPrecondition("the platform tenant cannot be suspended", reason="PLATFORM_TENANT")
        async with self._db.system_session() as s:
            row = await s.get(TenantRow, tenant_id)
            if row is None:
                raise NotFound("tenant not found", reason="TENANT_NOT_FOUND")
            row.status = status
        return row

    async def tenants_after(self, after_id: str, limit: int) -> list[TenantRow]:
        """Tenants by id after after_id, deleted ones too (the retention sweepers' listing: what deletion
        keeps is pruned by the policy the tenant had)."""
        async with self._db.system_session() as s:
            q = select(TenantRow).where(TenantRow.id > after_id).order_by(TenantRow.id).limit(limit)
            return list((await s.execute(q)).scalars())

    async def retention_policies(self) -> AsyncIterator[Policy]:
        """Every tenant's retention (identity's own sweeper's source; others ask ListRetentionPolicies)."""
        after = ""
        while rows := await self.tenants_after(after, 500):
            for r in rows:
                yield Policy(r.id, r.tier, *effective(r.audit_retention_days, r.usage_detail_retention_days))
            after = rows[-1].id

    async def set_retention(self, tenant_id: str, audit_days: int | None, usage_detail_days: int | None) -> TenantRow:
        """Set a tenant's retention (None: the default); the caller checked the bounds."""
        async with self._db.system_session() as s:
            row = await s.get(TenantRow, tenant_id)
            if row is None or row.status == "deleted":
                raise NotFound("tenant not found", reason="TENANT_NOT_FOUND")
            if (row.audit_retention_days, row.usage_detail_retention_days) != (audit_days, usage_detail_days):
                row.audit_retention_days, row.usage_detail_retention_days = audit_days, usage_detail_days
        return row

    # Principals ----------------------------------------------------------------------------
    async def create_principal(self, kind: str, display_name: str, scopes: list[str]) -> PrincipalRow:
        """A principal of the caller's tenant with at most the caller's scopes."""
        ctx = require_tenant()
        if kind not in PRINCIPAL_KINDS:
            raise InvalidArgument("unknown principal kind", violations={"kind": "USER, SERVICE_ACCOUNT or AGENT"})
        if not display_name or len(display_name) > 128:
            raise InvalidArgument(
                "display_name is required (at most 128 characters)", violations={"display_name": "1-128 characters"}
            )
        scopes = validate_scopes(scopes, field="scopes", tenant_id=ctx.tenant_id)
        if not covered(scopes, ctx.scopes):
            raise PermissionDenied(
                "a principal cannot be granted scopes its creator does not hold", reason="SCOPE_ESCALATION"
            )
        with tenant_scope(pooled(ctx)):
            async with self._db.session() as s:
                exists = (
                    await s.execute(select(PrincipalRow.id).where(PrincipalRow.display_name == display_name))
                ).first()
                if exists:
                    raise AlreadyExists(f"a principal named {display_name!r} exists", reason="PRINCIPAL_EXISTS")
                row = PrincipalRow(
                    id=new_id("p"),
                    kind=kind,
                    display_name=display_name,
                    scopes=scopes,
                    disabled=False,
                    created_at=utcnow(),
                )
                s.add(row)
        return row

    async def get_principal(self, principal_id: str) -> PrincipalRow:
        """A principal of the caller's tenant (NOT_FOUND for everyone else's)."""
        with tenant_scope(pooled(require_tenant())):
            async with self._db.session() as s:
                row = (
                    await s.execute(select(PrincipalRow).where(PrincipalRow.id == principal_id))
                ).scalar_one_or_none()
        if row is None:
            raise NotFound("principal not found", reason="PRINCIPAL_NOT_FOUND")
        return row

    async def list_principals(self, size: int, token: str) -> Page[PrincipalRow]:
        """The caller's principals, oldest first."""
        limit, after = page_size(size), paging.decode(token)
        with tenant_scope(pooled(require_tenant())):
            async with self._db.session() as s:
                q = _after(
                    select(PrincipalRow).order_by(PrincipalRow.created_at, PrincipalRow.id).limit(limit + 1),
                    PrincipalRow,
                    after,
                )
                rows = list((await s.execute(q)).scalars())
        return paging.keyset(rows, limit, lambda r: {"t": r.created_at, "id": r.id})

    async def disable_principal(self, principal_id: str) -> PrincipalRow:
        """Disable a principal of the caller's tenant: its keys stop issuing tokens."""
        ctx = require_tenant()
        if principal_id == ctx.principal_id:
            raise FailedPrecondition("a principal cannot disable itself", reason="SELF_DISABLE")
        with tenant_scope(pooled(ctx)):
            async with self._db.session() as s:
                row = (
                    await s.execute(select(PrincipalRow).where(PrincipalRow.id == principal_id))
                ).scalar_one_or_none()
                if row is None:
                    raise NotFound("principal not found", reason="PRINCIPAL_NOT_FOUND")
                row.disabled = True
        return row

    # API keys ------------------------------------------------------------------------------
    async def create_api_key(self, principal_id: str, scopes: list[str], display_name: str) -> tuple[ApiKeyRow, str]:
        """A key for a principal of the caller's tenant; scopes within the principal's and the caller's."""
        ctx = require_tenant()
        scopes = validate_scopes(scopes, field="scopes", tenant_id=ctx.tenant_id)
        with tenant_scope(pooled(ctx)):
            async with self._db.session() as s:
                principal = (
                    await s.execute(select(PrincipalRow).where(PrincipalRow.id == principal_id))
                ).scalar_one_or_none()
                if principal is None:
                    raise NotFound("principal not found", reason="PRINCIPAL_NOT_FOUND")
                if principal.disabled:
                    raise FailedPrecondition("principal is disabled", reason="PRINCIPAL_DISABLED")
                scopes = scopes or list(principal.scopes)
                if not covered(scopes, principal.scopes):
                    raise PermissionDenied(
                        "key scopes must be within the principal's scopes", reason="SCOPE_ESCALATION"
                    )
                if not covered(scopes, ctx.scopes):
                    raise PermissionDenied(
                        "a key cannot be granted scopes its creator does not hold", reason="SCOPE_ESCALATION"
                    )
                key_id = new_id("k")
                whole, prefix, digest = make_api_key(ctx.tenant_id, key_id)
                row = ApiKeyRow(
                    id=key_id,
                    principal_id=principal_id,
                    prefix=prefix,
                    secret_hash=digest,
                    scopes=scopes,
                    display_name=display_name[:128],
                    created_at=utcnow(),
                )
                s.add(row)
        return row, whole

    async def list_api_keys(self, principal_id: str, size: int, token: str) -> Page[ApiKeyRow]:
        """The caller's keys (metadata only), optionally one principal's."""
        limit, after = page_size(size), paging.decode(token, filters=principal_id)
        with tenant_scope(pooled(require_tenant())):
            async with self._db.session() as s:
                q = select(ApiKeyRow).order_by(ApiKeyRow.created_at, ApiKeyRow.id).limit(limit + 1)
                if principal_id:
                    q = q.where(ApiKeyRow.principal_id == principal_id)
                q = _after(q, ApiKeyRow, after)
                rows = list((await s.execute(q)).scalars())
        return paging.keyset(rows, limit, lambda r: {"t": r.created_at, "id": r.id}, filters=principal_id)

    async def revoke_api_key(self, key_id: str) -> ApiKeyRow:
        """Revoke a key of the caller's tenant (idempotent)."""
        with tenant_scope(pooled(require_tenant())):
            async with self._db.session() as s:
                row = (await s.execute(select(ApiKeyRow).where(ApiKeyRow.id == key_id))).scalar_one_or_none()
                if row is None:
                    raise NotFound("API key not found", reason="API_KEY_NOT_FOUND")
                row.revoked_at = row.revoked_at or utcnow()
        return row


def _after(query, model, after: dict | None):
    """Rows after a (created_at, id) keyset position, the order every listing here uses."""
    if not after:
        return query
    if not isinstance(after, dict) or not isinstance(after.get("t"), datetime) or not isinstance(after.get("id"), str):
        raise paging.invalid_token()  # signed by us, so only a token of another version of this code
    return query.where((model.created_at > after["t"]) | ((model.created_at == after["t"]) & (model.id > after["id"])))
