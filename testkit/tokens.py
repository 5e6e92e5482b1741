"""Tokens for tests: a real signing key in memory and the production verifier over it."""

from __future__ import annotations

from collections.abc import Iterable

from shared.tokens import SigningKey, StaticKeySource, TokenIssuer, TokenVerifier


class TestTokens:
    """Mints tokens any tenant's way; `.verifier` is what a service under test verifies with."""

    __test__ = False  # not a pytest class

    def __init__(self) -> None:
        self.key = SigningKey.generate()
        self.issuer = TokenIssuer(self.key)
        self.keys = StaticKeySource({self.key.kid: self.key.public_key})
        self.verifier = TokenVerifier(self.keys)

    def mint(
        self,
        tenant_id: str,
        scopes: Iterable[str] = ("*",),
        *,
        principal_id: str = "p_test",
        tier: str = "pooled",
        ttl: int = 300,
        **claims,
    ) -> str:
        """A signed token for tenant_id with scopes."""
        token, _ = self.issuer.issue(
            tenant_id=tenant_id, principal_id=principal_id, scopes=frozenset(scopes), tier=tier, ttl=ttl, **claims
        )
        return token

    def metadata(self, tenant_id: str, scopes: Iterable[str] = ("*",), **kw) -> tuple[tuple[str, str], ...]:
        """Call metadata for tenant_id: authorization + x-tenant-id."""
        return (("authorization", f"Bearer {self.mint(tenant_id, scopes, **kw)}"), ("x-tenant-id", tenant_id))

    def revoke(self, token_jti: str) -> None:
        """Mark a token id revoked."""
        self.keys.revoked.add(token_jti)
