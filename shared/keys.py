"""How services learn identity's public keys, revocations and suspended tenants.

Signing keys are public (ListSigningKeys). Revocations and suspensions name every tenant, so
ListRevokedTokens needs the platform scope platform.identity.verify: each service asks with its
own platform service key, which identity writes on first start (see SERVICE_PRINCIPALS).
"""
from __future__ import annotations

from pathlib import Path

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from bulkhead.identity.v1 import identity_pb2, identity_pb2_grpc
from shared.errors import Unavailable
from shared.logs import register_secret
from shared.tiers import tier_from_proto
from shared.tokens import RefreshingKeySource, TokenVerifier


class ServiceKeyCredentials:
    """A platform service's own key, read from its file when first needed and exchanged for tokens.

    Read lazily: on a first start identity writes the file only once it is up, which may be after
    this service started. A missing file is UNAVAILABLE, retried by the next poll.
    """

    def __init__(self, identity_channel: grpc.aio.Channel, key_file: Path | None):
        self._channel = identity_channel
        self._path = key_file
        self._token = None

    async def metadata(self) -> tuple[tuple[str, str], ...]:
        """authorization and x-tenant-id for one call with the service's platform token."""
        if self._token is None:
            from bulkhead.client import RefreshingToken  # the client's renewal logic, not a copy
            if self._path is None or not self._path.is_file():
                raise Unavailable(f"no service key at {self._path}: identity writes it on first start "
                                  "(or set BULKHEAD_<SERVICE>_SERVICE_KEY_FILE)")
            key = self._path.read_text().strip()
            register_secret(key)
            self._token = RefreshingToken(self._channel, key)
        token, tenant = await self._token.current()
        return ("authorization", f"Bearer {token}"), ("x-tenant-id", tenant)


class IdentityKeyLoader:
    """Loads keys from ListSigningKeys, revocations and suspended tenants from ListRevokedTokens."""

    def __init__(self, channel: grpc.aio.Channel, credentials: ServiceKeyCredentials, *, timeout: float = 3.0):
        self._stub = identity_pb2_grpc.IdentityServiceStub(channel)
        self._credentials = credentials
        self._timeout = timeout
        self._suspended: frozenset[str] = frozenset()
        self._migrations: tuple[frozenset[str], dict[str, tuple[str, int]], dict[str, str]] = (frozenset(), {}, {})

    async def load_keys(self) -> dict[str, Ed25519PublicKey]:
        resp = await self._stub.ListSigningKeys(identity_pb2.ListSigningKeysRequest(), timeout=self._timeout)
        return {k.kid: Ed25519PublicKey.from_public_bytes(k.public_key) for k in resp.keys}

    async def load_revocations(self, since: int) -> tuple[int, dict[str, int]]:
        resp = await self._stub.ListRevokedTokens(identity_pb2.ListRevokedTokensRequest(since_revision=since),
                                                  timeout=self._timeout, metadata=await self._credentials.metadata())
        self._suspended = frozenset(resp.suspended_tenant_ids)
        self._migrations = (frozenset(resp.migrating_tenant_ids),
                            {p.tenant_id: (tier_from_proto(p.tier).value, p.generation) for p in resp.placements},
                            {p.tenant_id: p.region for p in resp.placements if p.region})
        return resp.revision, {r.jti: r.expire_time.seconds for r in resp.revoked}

    async def load_suspended(self) -> frozenset[str]:
        return self._suspended  # came with the last ListRevokedTokens answer

    async def load_migrations(self) -> tuple[frozenset[str], dict[str, tuple[str, int]], dict[str, str]]:
        return self._migrations  # so did these (shared.tokens.MigrationFeed)


def remote_verifier(identity_channel: grpc.aio.Channel, key_file: Path | None, *, revocation_poll: float = 1.0) -> TokenVerifier:
    """A verifier whose keys, revocations and suspensions come from identity (every service but identity)."""
    loader = IdentityKeyLoader(identity_channel, ServiceKeyCredentials(identity_channel, key_file))
    return TokenVerifier(RefreshingKeySource(loader, revocation_poll=revocation_poll))
