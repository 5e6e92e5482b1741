"""Tokens: issued for API keys, exchanged for narrower agent tokens, revoked before expiry."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select

from services.identity.credentials import parse_api_key, secret_matches
from services.identity.directory import acting_as, covered, pooled, validate_scopes
from services.identity.signing import MAX_TOKEN_TTL, SigningKeys, as_utc, utcnow
from services.identity.store import (
    ApiKeyRow,
    IssuedTokenRow,
    PrincipalRow,
    RevocationRow,
    TenantRow,
    record_issued,
)
from shared.db import Database
from shared.errors import InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from shared.tenancy import require_tenant, tenant_scope
from shared.tokens import Claims, TokenIssuer, TokenVerifier

DEFAULT_TTL = 900
_BAD_KEY = "invalid API key: check it, or create a new one with `bulkhead keys create`"


@dataclass(frozen=True)
class IssuedToken:
    """A token and what it carries."""

    token: str
    claims: Claims


def _ttl(requested: int, ceiling: int) -> int:
    if requested < 0:
        raise InvalidArgument("ttl_seconds must not be negative", violations={"ttl_seconds": f"0 to {MAX_TOKEN_TTL}"})
    if requested > MAX_TOKEN_TTL:
        raise InvalidArgument(
            f"ttl_seconds is at most {MAX_TOKEN_TTL}", violations={"ttl_seconds": f"0 to {MAX_TOKEN_TTL}"}
        )
    return min(requested or DEFAULT_TTL, ceiling)


class Issuance:
    """Signs, exchanges and revokes tokens."""

    def __init__(self, db: Database, keys: SigningKeys, verifier: TokenVerifier):
        self._db = db
        self._keys = keys
        self._verifier = verifier

    async def issue(self, api_key: str, scopes: list[str], ttl_seconds: int) -> IssuedToken:
        """A token for a valid, unrevoked key of an active tenant and enabled principal."""
        parsed = parse_api_key(api_key)
        if parsed is None:
            raise Unauthenticated(_BAD_KEY, reason="INVALID_API_KEY")
        ttl = _ttl(ttl_seconds, MAX_TOKEN_TTL)
        with tenant_scope(acting_as(parsed.tenant_id)):
            async with self._db.session() as s:
                key = (await s.execute(select(ApiKeyRow).where(ApiKeyRow.id == parsed.key_id))).scalar_one_or_none()
                if key is None or not secret_matches(parsed.secret, key.secret_hash):
                    raise Unauthenticated(_BAD_KEY, reason="INVALID_API_KEY")
                if key.revoked_at is not None:
                    raise Unauthenticated(
                        "API key revoked: create a new one with `bulkhead keys create`", reason="API_KEY_REVOKED"
                    )
                tenant = await s.get(TenantRow, parsed.tenant_id)
                principal = (
                    await s.execute(select(PrincipalRow).where(PrincipalRow.id == key.principal_id))
                ).scalar_one()
                if tenant is None or tenant.status != "active":
                    raise PermissionDenied(
                        "tenant is suspended: contact the platform operator", reason="TENANT_SUSPENDED"
                    )
                if principal.disabled:
                    raise PermissionDenied("principal is disabled", reason="PRINCIPAL_DISABLED")
                wanted = validate_scopes(scopes, field="scopes", tenant_id=parsed.tenant_id) or list(key.scopes)
                if not covered(wanted, key.scopes) or not covered(wanted, principal.scopes):
                    raise PermissionDenied("requested scopes exceed the key's scopes", reason="SCOPE_ESCALATION")
                signer = TokenIssuer(await self._keys.active())
                token, claims = signer.issue(
                    tenant_id=tenant.id, principal_id=principal.id, scopes=frozenset(wanted), tier=tenant.tier, ttl=ttl
                )
                key.last_used_at = utcnow()
                s.add(
                    IssuedTokenRow(
                        jti=claims.jti,
                        principal_id=principal.id,
                        expires_at=datetime.fromtimestamp(claims.expires_at, UTC),
                    )
                )
        return IssuedToken(token, claims)

    async def exchange(self, scopes: list[str], agent_id: str, run_id: str, ttl_seconds: int) -> IssuedToken:
        """A narrower token for an agent; its act claim names the caller, and it dies no later than the caller's."""
        ctx = require_tenant()
        if not scopes:
            raise InvalidArgument("name the scopes the delegated token needs", violations={"scopes": "at least one"})
        wanted = validate_scopes(scopes, field="scopes", tenant_id=ctx.tenant_id)
        if not covered(wanted, ctx.scopes):
            raise PermissionDenied("a delegated token cannot hold scopes the caller lacks", reason="SCOPE_ESCALATION")
        caller = await self._verifier.verify(ctx.token)
        remaining = caller.expires_at - int(utcnow().timestamp())
        ttl = _ttl(ttl_seconds, max(remaining, 1))
        signer = TokenIssuer(await self._keys.active())
        subject = f"agent:{agent_id}" if agent_id else ctx.principal_id
        token, claims = signer.issue(
            tenant_id=ctx.tenant_id,
            principal_id=subject,
            scopes=frozenset(wanted),
            tier=ctx.tier,
            ttl=ttl,
            actor_id=ctx.principal_id,
            agent_id=agent_id or None,
            run_id=run_id or None,
        )
        await record_issued(
            self._db,
            tenant_id=ctx.tenant_id,
            jti=claims.jti,
            principal_id=subject,
            expires_at=datetime.fromtimestamp(claims.expires_at, UTC),
        )
        return IssuedToken(token, claims)

    async def revoke(self, jti: str) -> RevocationRow:
        """Revoke a token of the caller's tenant; verifiers everywhere refuse it within seconds."""
        if not jti:
            raise InvalidArgument("jti is required", violations={"jti": "the token id to revoke"})
        with tenant_scope(pooled(require_tenant())):
            async with self._db.session() as s:
                issued = (await s.execute(select(IssuedTokenRow).where(IssuedTokenRow.jti == jti))).scalar_one_or_none()
                if issued is None:
                    raise NotFound("token not found", reason="TOKEN_NOT_FOUND")
                existing = (await s.execute(select(RevocationRow).where(RevocationRow.jti == jti))).scalar_one_or_none()
                if existing is not None:
                    return existing
                issued.revoked_at = utcnow()
                row = RevocationRow(jti=jti, expires_at=as_utc(issued.expires_at))
                s.add(row)
        return row
