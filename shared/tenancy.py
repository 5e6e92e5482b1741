"""Who a request acts for: the TenantContext, carried in a contextvar for the life of one RPC."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field

from shared.tiers import Tier

PLATFORM_TENANT = "t_platform"
"""The tenant whose principals are platform operators."""

OPERATOR_SCOPE = "platform.operator"
"""The scope that admin RPCs acting across tenants require."""

TIERS = tuple(t.value for t in Tier)
"""The tier names, for validating input (shared.tiers.Tier is the type)."""


class NoTenantContext(RuntimeError):
    """Raised when tenant-scoped work runs without a tenant: we fail closed, never open."""


def scope_matches(granted: str, required: str) -> bool:
    """Whether one granted scope covers the required one (exact, `a.b.*`, or `*` outside platform.*)."""
    if granted == required:
        return True
    if granted == "*":
        return not required.startswith("platform.")
    if granted.endswith(".*"):
        return required.startswith(granted[:-1])
    return False


@dataclass(frozen=True, slots=True)
class TenantContext:
    """The verified identity a request acts for."""

    tenant_id: str
    """The tenant every read and write of this request is confined to."""
    principal_id: str
    """The user, service account or agent the token was issued to."""
    scopes: frozenset[str] = frozenset()
    """What the token allows; see scope_matches."""
    tier: str = "pooled"
    """The tenant's isolation tier: pooled, bridge or silo."""
    request_id: str = ""
    """Correlates logs, spans and usage; the idempotency key of derived work."""
    token: str = field(default="", repr=False)
    """The bearer token, forwarded on calls made on this tenant's behalf. Never logged."""
    actor_id: str | None = None
    """The delegator, when this token came from ExchangeToken."""
    agent_id: str | None = None
    """The agent this request is made for, if any (a tag for metering and traces)."""
    run_id: str | None = None
    """The orchestrator run this request belongs to, if any."""

    def has_scope(self, scope: str) -> bool:
        """Whether the token grants `scope`."""
        return any(scope_matches(g, scope) for g in self.scopes)

    @property
    def is_operator(self) -> bool:
        """A platform operator: the platform tenant holding the operator scope."""
        return self.tenant_id == PLATFORM_TENANT and self.has_scope(OPERATOR_SCOPE)

    def as_metadata(self) -> tuple[tuple[str, str], ...]:
        """The gRPC metadata that carries this identity to another service."""
        md: list[tuple[str, str]] = [("x-tenant-id", self.tenant_id)]
        if self.token:
            md.append(("authorization", f"Bearer {self.token}"))
        if self.request_id:
            md.append(("x-request-id", self.request_id))
        if self.agent_id:
            md.append(("x-agent-id", self.agent_id))
        if self.run_id:
            md.append(("x-run-id", self.run_id))
        return tuple(md)


_tenant: contextvars.ContextVar[TenantContext | None] = contextvars.ContextVar("bulkhead_tenant", default=None)


def current_tenant() -> TenantContext | None:
    """The tenant of the running request, or None outside one."""
    return _tenant.get()


def require_tenant() -> TenantContext:
    """The tenant of the running request; raises NoTenantContext when there is none."""
    ctx = _tenant.get()
    if ctx is None:
        raise NoTenantContext("no tenant context: tenant-scoped work refused (fail closed)")
    return ctx


def set_tenant(ctx: TenantContext | None) -> contextvars.Token:
    """Bind ctx to the current task (the server interceptor does this once per RPC)."""
    return _tenant.set(ctx)


@contextlib.contextmanager
def tenant_scope(ctx: TenantContext) -> Iterator[TenantContext]:
    """Run a block as `ctx` (background work on behalf of one tenant, tests)."""
    token = _tenant.set(ctx)
    try:
        yield ctx
    finally:
        _tenant.reset(token)


@contextlib.contextmanager
def acting_for(tenant_id: str, *, tier: Tier | str) -> Iterator[TenantContext]:
    """Run a block in another tenant's data context on the current caller's behalf (an operator, a platform service).

    The tier is required, never defaulted: it picks where the tenant's rows live, and a wrong one
    writes where the tenant's own calls never read. Ask identity for it (shared.tiers.IdentityTiers)
    when the tenant's own token is not at hand. The block gets no scopes and no token to forward.
    """
    if not tenant_id:
        raise ValueError("acting_for needs a tenant id")
    checked = Tier.parse(tier)
    caller = require_tenant()
    ctx = TenantContext(
        tenant_id=tenant_id,
        principal_id=caller.principal_id,
        tier=checked.value,
        request_id=caller.request_id,
        actor_id=caller.principal_id,
    )
    with tenant_scope(ctx):
        yield ctx
