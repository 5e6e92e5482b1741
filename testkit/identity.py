"""A real identity service for tests, and tenants made through its public API."""

from __future__ import annotations

import io
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from bulkhead.common.v1 import tenancy_pb2
from bulkhead.identity.v1 import identity_pb2 as pb
from bulkhead.identity.v1 import identity_pb2_grpc


@dataclass(frozen=True)
class TenantHandle:
    """A tenant created through identity, with its admin's key and a token."""

    tenant_id: str
    api_key: str
    token: str
    jti: str

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata for this tenant's admin token."""
        return (("authorization", f"Bearer {self.token}"), ("x-tenant-id", self.tenant_id))


class IdentityHarness:
    """Talks to a running identity as its operator."""

    def __init__(self, app, channel: grpc.aio.Channel):
        self.app = app
        self.channel = channel
        self.stub = identity_pb2_grpc.IdentityServiceStub(channel)
        self.operator: TenantHandle | None = None

    @property
    def address(self) -> str:
        return self.app.running.address

    def service_key_file(self, service: str) -> Path:
        """The key file identity wrote for a platform service (e.g. "state")."""
        return self.app.service_keys_dir / f"{service}.key"

    def verifier(self, channel: grpc.aio.Channel, *, service: str = "state", revocation_poll: float = 0.2):
        """A verifier as `service` runs one: keys, revocations and suspensions from identity over `channel`."""
        from shared.keys import remote_verifier

        return remote_verifier(channel, self.service_key_file(service), revocation_poll=revocation_poll)

    async def login(self, api_key: str, scopes: tuple[str, ...] = (), ttl: int = 0) -> TenantHandle:
        """Trade an API key for a token."""
        resp = await self.stub.IssueToken(pb.IssueTokenRequest(api_key=api_key, scopes=scopes, ttl_seconds=ttl))
        return TenantHandle(resp.tenant_id, api_key, resp.token, resp.jti)

    async def tenant(self, name: str | None = None, tier: tenancy_pb2.Tier = tenancy_pb2.TIER_POOLED) -> TenantHandle:
        """A new tenant (operator call) and its admin's token."""
        assert self.operator is not None
        created = await self.stub.CreateTenant(
            pb.CreateTenantRequest(name=name or f"t-{uuid.uuid4().hex[:10]}", tier=tier),
            metadata=self.operator.metadata,
        )
        return await self.login(created.admin_api_key)


@asynccontextmanager
async def running_identity(
    data_dir: Path,
    *,
    database_url: str | None = None,
    owner_url: str | None = None,
    revocation_poll: float = 0.2,
    env: dict[str, str] | None = None,
):
    """Start identity on a free port (SQLite in data_dir unless database URLs are given); `env` adds
    settings (e.g. BULKHEAD_REGIONS)."""
    from services.identity.config import IdentityConfig
    from services.identity.server import start

    env = {**(env or {}), "BULKHEAD_DATA_DIR": str(data_dir), "BULKHEAD_REVOCATION_POLL_SECONDS": str(revocation_poll)}
    if database_url:
        env["BULKHEAD_IDENTITY_DATABASE_URL"] = database_url
        env["BULKHEAD_IDENTITY_DATABASE_OWNER_URL"] = owner_url or database_url
    app = await start(IdentityConfig.from_env(env), address="127.0.0.1:0", announce=io.StringIO())
    channel = grpc.aio.insecure_channel(app.running.address)
    harness = IdentityHarness(app, channel)
    key = app.operator_key or (data_dir / "operator.key").read_text().strip()
    harness.operator = await harness.login(key)
    try:
        yield harness
    finally:
        await channel.close()
        await app.close(0)
