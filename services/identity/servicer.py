"""identity's RPC handlers: proto in, domain call, proto out. Errors are raised, never set by hand."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from bulkhead.identity.v1 import identity_pb2 as pb
from bulkhead.identity.v1 import identity_pb2_grpc
from services.identity.deletion import Deletions, DeletionView
from services.identity.directory import Directory
from services.identity.issuance import Issuance
from services.identity.migration import MigrationRpcs, published_feed
from services.identity.signing import SigningKeys, as_utc
from services.identity.store import ApiKeyRow, PrincipalRow, RevocationRow, SigningKeyRow, TenantRow
from shared import paging
from shared.config_audit import ConfigAudit, new_of
from shared.db import Database
from shared.errors import FailedPrecondition, InvalidArgument, NotFound
from shared.ids import check_tenant_id
from shared.paging import page_size
from shared.retention import checked_days, effective
from shared.tenancy import PLATFORM_TENANT, require_tenant
from shared.tiers import UnknownTier, tier_from_proto, tier_to_proto
from shared.tokens import RefreshingKeySource

_STATUS = {
    "active": pb.TENANT_STATUS_ACTIVE,
    "suspended": pb.TENANT_STATUS_SUSPENDED,
    "deleting": pb.TENANT_STATUS_DELETING,
    "deleted": pb.TENANT_STATUS_DELETED,
}
_DELETION_STATE = {
    "scheduled": pb.DELETION_STATE_SCHEDULED,
    "running": pb.DELETION_STATE_RUNNING,
    "done": pb.DELETION_STATE_DONE,
}
_VERB = {"active": "resume", "suspended": "suspend"}
_KINDS = {
    "user": pb.PRINCIPAL_KIND_USER,
    "service_account": pb.PRINCIPAL_KIND_SERVICE_ACCOUNT,
    "agent": pb.PRINCIPAL_KIND_AGENT,
}


def _ts(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(as_utc(value).astimezone(UTC).replace(tzinfo=None))
    return ts


def _epoch(seconds: int) -> Timestamp:
    return Timestamp(seconds=seconds)


def retention_pb(row: TenantRow) -> pb.RetentionPolicy:
    audit_days, usage_days = effective(row.audit_retention_days, row.usage_detail_retention_days)
    return pb.RetentionPolicy(
        audit_days=audit_days,
        usage_detail_days=usage_days,
        audit_days_default=row.audit_retention_days is None,
        usage_detail_days_default=row.usage_detail_retention_days is None,
    )


def tenant_pb(row: TenantRow) -> pb.Tenant:
    return pb.Tenant(
        id=row.id,
        name=row.name,
        tier=tier_to_proto(row.tier),
        region=row.region,
        status=_STATUS[row.status],
        create_time=_ts(row.created_at),
        retention=retention_pb(row),
    )


def principal_pb(row: PrincipalRow) -> pb.Principal:
    return pb.Principal(
        id=row.id,
        kind=_KINDS[row.kind],
        display_name=row.display_name,
        scopes=row.scopes,
        disabled=row.disabled,
        create_time=_ts(row.created_at),
    )


def api_key_pb(row: ApiKeyRow) -> pb.ApiKey:
    return pb.ApiKey(
        id=row.id,
        principal_id=row.principal_id,
        prefix=row.prefix,
        scopes=row.scopes,
        display_name=row.display_name,
        create_time=_ts(row.created_at),
        revoke_time=_ts(row.revoked_at),
        last_used_time=_ts(row.last_used_at),
    )


def deletion_pb(view: DeletionView) -> pb.TenantDeletion:
    row = view.row
    return pb.TenantDeletion(
        tenant_id=row.tenant_id,
        state=_DELETION_STATE[row.state],
        delete_after_time=_ts(row.delete_after),
        request_time=_ts(row.requested_at),
        complete_time=_ts(row.completed_at),
        steps=[
            pb.DeletionStep(service=s.service, done=s.done, attempts=s.attempts, last_error=s.last_error)
            for s in view.steps
        ],
    )


def revoked_pb(row: RevocationRow) -> pb.RevokedToken:
    return pb.RevokedToken(jti=row.jti, expire_time=_ts(row.expires_at))


class IdentityServicer(MigrationRpcs, identity_pb2_grpc.IdentityServiceServicer):
    """Maps identity's RPCs onto the directory, issuance and signing-key ring."""

    def __init__(
        self,
        db: Database,
        directory: Directory,
        issuance: Issuance,
        keys: SigningKeys,
        key_source: RefreshingKeySource | None = None,
        deletions: Deletions | None = None,
        *,
        audit: ConfigAudit,
    ):
        self._db = db
        self._audit = audit
        self._deletions = deletions
        self._directory = directory
        self._issuance = issuance
        self._keys = keys
        self._key_source = key_source

    async def CreateTenant(self, request, context):
        try:
            tier = tier_from_proto(request.tier)
        except UnknownTier:
            raise InvalidArgument(
                "unknown tier", violations={"tier": "TIER_POOLED, TIER_BRIDGE or TIER_SILO"}
            ) from None
        async with self._audit.change(
            "tenant.create",
            tenant_id=None,
            tables={"tenants"},
            describe=new_of(TenantRow, "tenant/{id}", name="{name}", tier="{tier}", region="{region}"),
        ):
            created = await self._directory.create_tenant(request.name, tier, request.region)
        return pb.CreateTenantResponse(
            tenant=tenant_pb(created.tenant), admin=principal_pb(created.admin), admin_api_key=created.admin_api_key
        )

    async def GetTenant(self, request, context):
        ctx = require_tenant()
        wanted = check_tenant_id(request.tenant_id) if request.tenant_id else ctx.tenant_id
        if wanted != ctx.tenant_id and not ctx.is_operator:
            raise NotFound("tenant not found", reason="TENANT_NOT_FOUND")  # no existence leak to other tenants
        return pb.GetTenantResponse(tenant=tenant_pb(await self._directory.get_tenant(wanted)))

    async def GetTenantPlacement(self, request, context):
        check_tenant_id(request.tenant_id)
        row = await self._directory.get_tenant(request.tenant_id)
        return pb.GetTenantPlacementResponse(tenant_id=row.id, tier=tier_to_proto(row.tier), region=row.region)

    async def SetRetentionPolicy(self, request, context):
        check_tenant_id(request.tenant_id)
        audit_days = checked_days("audit_days", request.audit_days)
        usage_days = checked_days("usage_detail_days", request.usage_detail_days)
        in_force = effective(audit_days, usage_days)
        async with self._audit.change(
            "tenant.retention",
            tenant_id=request.tenant_id,
            target=f"tenant/{request.tenant_id}",
            tables={"tenants"},
            detail={"audit_days": in_force[0], "usage_detail_days": in_force[1]},
        ):
            row = await self._directory.set_retention(request.tenant_id, audit_days, usage_days)
        return pb.SetRetentionPolicyResponse(tenant_id=row.id, retention=retention_pb(row))

    async def GetRetentionPolicy(self, request, context):
        ctx = require_tenant()
        wanted = check_tenant_id(request.tenant_id) if request.tenant_id else ctx.tenant_id
        if wanted != ctx.tenant_id and not ctx.is_operator:
            raise NotFound("tenant not found", reason="TENANT_NOT_FOUND")  # no existence leak to other tenants
        row = await self._directory.get_tenant(wanted)
        return pb.GetRetentionPolicyResponse(tenant_id=row.id, retention=retention_pb(row))

    async def ListRetentionPolicies(self, request, context):
        size = page_size(request.page_size)
        after = paging.decode(request.page_token) or ""
        if not isinstance(after, str):
            raise paging.invalid_token()
        page = paging.keyset(await self._directory.tenants_after(after, size + 1), size, lambda r: r.id)
        return pb.ListRetentionPoliciesResponse(
            tenants=[
                pb.TenantRetention(tenant_id=r.id, tier=tier_to_proto(r.tier), retention=retention_pb(r))
                for r in page.items
            ],
            next_page_token=page.next_page_token,
        )

    async def ListTenants(self, request, context):
        page = await self._directory.list_tenants(request.page_size, request.page_token)
        return pb.ListTenantsResponse(tenants=[tenant_pb(t) for t in page.items], next_page_token=page.next_page_token)

    async def UpdateTenantStatus(self, request, context):
        status = {pb.TENANT_STATUS_ACTIVE: "active", pb.TENANT_STATUS_SUSPENDED: "suspended"}.get(request.status, "")
        current = await self._directory.get_tenant(check_tenant_id(request.tenant_id))
        if current is not None and current.status == "deleted":
            raise FailedPrecondition("the tenant was deleted", reason="TENANT_DELETED")
        if (
            current is not None
            and current.status == "deleting"
            and status
            and (status != "active" or self._deletions is None)
        ):
            raise FailedPrecondition(
                "the tenant is being deleted: resume it (ACTIVE) to cancel the deletion", reason="TENANT_DELETING"
            )
        async with self._audit.change(
            f"tenant.{_VERB.get(status, 'status')}",
            tenant_id=request.tenant_id,
            target=f"tenant/{request.tenant_id}",
            tables={"tenants"},
            detail={"status": status},
        ):
            if current is not None and current.status == "deleting" and status:
                await self._deletions_or_fail().restore(request.tenant_id)  # DELETION_STARTED once purging began
            row = await self._directory.set_tenant_status(request.tenant_id, status)
        if self._key_source is not None:  # identity's own verifier knows at once; other services poll
            await self._key_source.refresh_revocations()
        return pb.UpdateTenantStatusResponse(tenant=tenant_pb(row))

    async def CreatePrincipal(self, request, context):
        kind = {v: k for k, v in _KINDS.items()}.get(request.kind, "")
        async with self._audit.change_own(
            "principal.create",
            target="",
            tables={"principals"},
            describe=new_of(
                PrincipalRow, "principal/{id}", kind="{kind}", display_name="{display_name}", scopes="{scopes}"
            ),
        ):
            row = await self._directory.create_principal(kind, request.display_name, list(request.scopes))
        return pb.CreatePrincipalResponse(principal=principal_pb(row))

    async def GetPrincipal(self, request, context):
        return pb.GetPrincipalResponse(
            principal=principal_pb(await self._directory.get_principal(request.principal_id))
        )

    async def ListPrincipals(self, request, context):
        page = await self._directory.list_principals(request.page_size, request.page_token)
        return pb.ListPrincipalsResponse(
            principals=[principal_pb(p) for p in page.items], next_page_token=page.next_page_token
        )

    async def DisablePrincipal(self, request, context):
        async with self._audit.change_own(
            "principal.disable", target=f"principal/{request.principal_id}", tables={"principals"}
        ):
            row = await self._directory.disable_principal(request.principal_id)
        return pb.DisablePrincipalResponse(principal=principal_pb(row))

    async def CreateApiKey(self, request, context):
        async with self._audit.change_own(
            "api_key.create",
            target="",
            tables={"api_keys"},
            describe=new_of(
                ApiKeyRow,
                "api_key/{id}",
                principal_id="{principal_id}",
                scopes="{scopes}",
                display_name="{display_name}",
            ),
        ):
            row, secret = await self._directory.create_api_key(
                request.principal_id, list(request.scopes), request.display_name
            )
        return pb.CreateApiKeyResponse(api_key=api_key_pb(row), secret=secret)

    async def ListApiKeys(self, request, context):
        page = await self._directory.list_api_keys(request.principal_id, request.page_size, request.page_token)
        return pb.ListApiKeysResponse(
            api_keys=[api_key_pb(k) for k in page.items], next_page_token=page.next_page_token
        )

    async def RevokeApiKey(self, request, context):
        async with self._audit.change_own(
            "api_key.revoke", target=f"api_key/{request.api_key_id}", tables={"api_keys"}
        ):
            row = await self._directory.revoke_api_key(request.api_key_id)
        return pb.RevokeApiKeyResponse(api_key=api_key_pb(row))

    async def IssueToken(self, request, context):
        issued = await self._issuance.issue(request.api_key, list(request.scopes), request.ttl_seconds)
        c = issued.claims
        return pb.IssueTokenResponse(
            token=issued.token,
            tenant_id=c.tenant_id,
            expire_time=_epoch(c.expires_at),
            scopes=sorted(c.scopes),
            jti=c.jti,
        )

    async def ExchangeToken(self, request, context):
        issued = await self._issuance.exchange(
            list(request.scopes), request.agent_id, request.run_id, request.ttl_seconds
        )
        c = issued.claims
        return pb.ExchangeTokenResponse(
            token=issued.token, expire_time=_epoch(c.expires_at), scopes=sorted(c.scopes), jti=c.jti
        )

    async def RevokeToken(self, request, context):
        async with self._audit.change_own(
            "token.revoke", target=f"token/{request.jti}", tables={"issued_tokens", "revocations"}
        ):
            row = await self._issuance.revoke(request.jti)
        return pb.RevokeTokenResponse(revoked=revoked_pb(row))

    async def ListRevokedTokens(self, request, context):
        if request.since_revision < 0:
            raise InvalidArgument("since_revision must not be negative", violations={"since_revision": ">= 0"})
        (revision, entries), suspended, (migrating, placements, regions) = await published_feed(
            self._db, request.since_revision
        )
        return pb.ListRevokedTokensResponse(
            revoked=[pb.RevokedToken(jti=j, expire_time=_epoch(exp)) for j, exp in entries.items()],
            revision=revision,
            suspended_tenant_ids=sorted(suspended),
            migrating_tenant_ids=sorted(migrating),
            placements=[
                pb.TenantTierPlacement(tenant_id=t, tier=tier_to_proto(tier), generation=gen, region=regions.get(t, ""))
                for t, (tier, gen) in sorted(placements.items())
            ],
        )

    async def ListSigningKeys(self, request, context):
        rows = await self._keys.published()
        return pb.ListSigningKeysResponse(
            keys=[
                pb.SigningKey(
                    kid=r.kid,
                    algorithm="EdDSA",
                    public_key=r.public_key,
                    active=r.active,
                    create_time=_ts(r.created_at),
                    retire_time=_ts(r.retired_at),
                )
                for r in rows
            ]
        )

    async def RotateSigningKey(self, request, context):
        # The platform's signing keys: on t_platform's chain (the new key id only, never key material).
        async with self._audit.change(
            "signing_key.rotate",
            tenant_id=PLATFORM_TENANT,
            tables={"signing_keys"},
            describe=new_of(SigningKeyRow, "signing_key/{kid}"),
        ):
            key = await self._keys.rotate()
        rows = {r.kid: r for r in await self._keys.published()}
        row = rows[key.kid]
        return pb.RotateSigningKeyResponse(
            key=pb.SigningKey(
                kid=row.kid, algorithm="EdDSA", public_key=row.public_key, active=True, create_time=_ts(row.created_at)
            )
        )

    async def DeleteTenant(self, request, context):
        deletions = self._deletions_or_fail()
        check_tenant_id(request.tenant_id)
        async with self._audit.change(
            "tenant.delete",
            tenant_id=request.tenant_id,
            target=f"tenant/{request.tenant_id}",
            tables={"tenant_deletions", "tenants"},
            detail={"grace_seconds": request.grace_seconds, "now": request.now},
        ):
            view = await deletions.schedule(request.tenant_id, request.grace_seconds, request.now)
        return pb.DeleteTenantResponse(deletion=deletion_pb(view))

    async def GetDeletionReceipt(self, request, context):
        check_tenant_id(request.tenant_id)
        view = await self._deletions_or_fail().get(request.tenant_id)
        reply = pb.GetDeletionReceiptResponse(deletion=deletion_pb(view))
        if view.row.receipt_body:
            async with self._db.system_session() as s:
                key = await s.get_one(SigningKeyRow, view.row.receipt_kid)
            reply.receipt.CopyFrom(
                pb.DeletionReceipt(
                    body=view.row.receipt_body,
                    signature=view.row.receipt_signature,
                    kid=view.row.receipt_kid,
                    public_key=key.public_key,
                )
            )
        return reply

    def _deletions_or_fail(self) -> Deletions:
        if self._deletions is None:
            raise FailedPrecondition("tenant deletion is not configured on this identity", reason="NO_DELETIONS")
        return self._deletions
