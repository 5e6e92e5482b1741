"""The mesh the matrix attacks: six real services in this process, three tenants, B's resources.

Tenants: A (the attacker, an admin of its own tenant), B (the victim, one resource of every
type) and C (suspended once its token is minted). Every token is real: minted by identity.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from bulkhead.identity.v1 import identity_pb2 as idn
from shared.errors import error_details
from testkit.fake_anthropic import FakeAnthropic
from testkit.identity import TenantHandle
from tests.services.orchestrator.mesh import Mesh, running_mesh

from . import forged
from .factories import Ids
from .resources import SECRET_VALUE, make_victim


def md(token: str, tenant_id: str) -> tuple[tuple[str, str], ...]:
    """Call metadata: this bearer token, this x-tenant-id."""
    return (("authorization", f"Bearer {token}"), ("x-tenant-id", tenant_id))


@dataclass
class Rig:
    """What the attacks need: where each service listens, the tenants, their tokens, B's ids."""

    mesh: Mesh
    channels: dict[str, grpc.aio.Channel]
    a: TenantHandle
    b: TenantHandle
    b_ids: Ids
    tokens: dict[str, str] = field(default_factory=dict)
    """Attack name -> a bearer value prepared once (forged, expired, revoked, narrowed...)."""
    suspended: TenantHandle | None = None
    markers: list[bytes] = field(default_factory=list)
    """Everything of B's that must never reach A."""
    propagation: dict[str, float] = field(default_factory=dict)
    """Seconds until every service refused: "revoked" token, "suspended" tenant."""
    upstream: FakeAnthropic | None = None
    """The fake provider every model call reaches (what it was sent, with which key)."""


async def _channels(mesh: Mesh) -> dict[str, grpc.aio.Channel]:
    """One plain channel per service: attackers send whatever metadata they like, nothing is forwarded."""
    addrs = {
        "identity": mesh.identity.address,
        "orchestrator": mesh.orchestrator.address,
        **{s: mesh.addr(s) for s in ("credentials", "state", "inference", "metering")},
    }
    return {name: grpc.aio.insecure_channel(addr) for name, addr in addrs.items()}


async def _narrowed(mesh: Mesh, a: TenantHandle) -> dict[str, str]:
    """Two of A's tokens narrowed to one scope each: every method lacks at least one of them."""
    out = {}
    for scope in ("metering.prices.read", "identity.tenants.read"):
        out[f"narrowed:{scope}"] = (await mesh.identity.login(a.api_key, scopes=(scope,))).token
    return out


async def _refused_everywhere(ch: dict[str, grpc.aio.Channel], metadata, reason: str, timeout: float = 5.0) -> float:
    """Wait until every service refuses metadata with reason; how long it took (revocation propagation)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    for name, path in _PROBES.items():  # an empty message is a valid request of every probe
        call = ch[name].unary_unary(path, request_serializer=bytes, response_deserializer=bytes)
        while True:
            try:
                await call(b"", metadata=metadata)
            except grpc.aio.AioRpcError as err:
                if error_details(err)["reason"] == reason:
                    break
            if loop.time() - start > timeout:
                raise AssertionError(f"{name} still accepts a token that should be refused with {reason}")
            await asyncio.sleep(0.05)
    return loop.time() - start


_PROBES = {
    "identity": "/bulkhead.identity.v1.IdentityService/ListPrincipals",
    "metering": "/bulkhead.metering.v1.MeteringService/GetQuotaStatus",
    "credentials": "/bulkhead.credentials.v1.CredentialsService/VerifyAccessEvents",
    "state": "/bulkhead.state.v1.StateService/ListThreads",
    "inference": "/bulkhead.inference.v1.InferenceService/GetModelPolicy",
    "orchestrator": "/bulkhead.orchestrator.v1.OrchestratorService/ListTeams",
}


@contextlib.asynccontextmanager
async def running_rig(data_dir: Path) -> AsyncIterator[Rig]:
    """The mesh (runs stay queued: nothing reaches a model), tenants A, B and suspended C, every token."""
    async with FakeAnthropic() as upstream, running_mesh(data_dir, upstream_url=upstream.base_url) as mesh:
        await mesh.orchestrator.dispatcher.stop()
        ch = await _channels(mesh)
        try:
            a, b, c = await asyncio.gather(mesh.tenant(), mesh.tenant(), mesh.tenant())
            rig = Rig(mesh, ch, a, b, await make_victim(mesh, ch, b), upstream=upstream)
            rig.markers = [*rig.b_ids.markers(), SECRET_VALUE]
            rig.tokens.update(await _narrowed(mesh, a))
            key = await mesh.identity.app.keys.active()
            rig.tokens.update(
                {
                    "expired": forged.expired(key, a.token),
                    "tampered": forged.tampered(a.token, tid=b.tenant_id),
                    "alg_none": forged.alg_none(a.token),
                    "foreign_key": forged.signed_by_stranger(a.token),
                    "unknown_kid": forged.signed_by_stranger(a.token, kid="k" + secrets.token_urlsafe(12)),
                }
            )
            revoked = await mesh.identity.login(a.api_key)
            await mesh.identity.stub.RevokeToken(idn.RevokeTokenRequest(jti=revoked.jti), metadata=a.metadata)
            rig.tokens["revoked"] = revoked.token
            await mesh.identity.stub.UpdateTenantStatus(
                idn.UpdateTenantStatusRequest(tenant_id=c.tenant_id, status=idn.TENANT_STATUS_SUSPENDED),
                metadata=mesh.identity.operator.metadata,
            )
            rig.suspended = c
            took = await asyncio.gather(
                _refused_everywhere(ch, md(revoked.token, a.tenant_id), "TOKEN_REVOKED"),
                _refused_everywhere(ch, c.metadata, "TENANT_SUSPENDED"),
            )
            rig.propagation = dict(zip(("revoked", "suspended"), took, strict=True))
            yield rig
        finally:
            for channel in ch.values():
                await channel.close()
