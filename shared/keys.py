"""How services learn identity's public keys and revocations (over identity's public RPCs)."""
from __future__ import annotations

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from bulkhead.identity.v1 import identity_pb2, identity_pb2_grpc
from shared.tokens import RefreshingKeySource, TokenVerifier


class IdentityKeyLoader:
    """Loads keys and revocations from identity's ListSigningKeys / ListRevokedTokens."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout: float = 3.0):
        self._stub = identity_pb2_grpc.IdentityServiceStub(channel)
        self._timeout = timeout

    async def load_keys(self) -> dict[str, Ed25519PublicKey]:
        resp = await self._stub.ListSigningKeys(identity_pb2.ListSigningKeysRequest(), timeout=self._timeout)
        return {k.kid: Ed25519PublicKey.from_public_bytes(k.public_key) for k in resp.keys}

    async def load_revocations(self, since: int) -> tuple[int, dict[str, int]]:
        resp = await self._stub.ListRevokedTokens(identity_pb2.ListRevokedTokensRequest(since_revision=since),
                                                  timeout=self._timeout)
        return resp.revision, {r.jti: r.expire_time.seconds for r in resp.revoked}


def remote_verifier(identity_channel: grpc.aio.Channel, *, revocation_poll: float = 2.0) -> TokenVerifier:
    """A verifier whose keys come from identity (every service but identity uses this)."""
    return TokenVerifier(RefreshingKeySource(IdentityKeyLoader(identity_channel), revocation_poll=revocation_poll))
