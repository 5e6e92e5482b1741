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

from bulkhead.credentials.v1 import credentials_pb2 as cred
from bulkhead.credentials.v1 import credentials_pb2_grpc
from bulkhead.identity.v1 import identity_pb2 as idn
from bulkhead.inference.v1 import inference_pb2 as inf
from bulkhead.inference.v1 import inference_pb2_grpc
from bulkhead.metering.v1 import metering_pb2 as met
from bulkhead.metering.v1 import metering_pb2_grpc
from bulkhead.orchestrator.v1 import orchestrator_pb2 as orch
from bulkhead.state.v1 import state_pb2 as st
from bulkhead.state.v1 import state_pb2_grpc
from shared.errors import error_details
from shared.testing.fake_anthropic import FakeAnthropic
from shared.testing.identity import TenantHandle
from tests.services.orchestrator.mesh import Mesh, running_mesh, team_pb

from . import forged
from .factories import MODEL, Ids, _params, _scope, _usage

SECRET_VALUE = b"b-secret-" + secrets.token_hex(8).encode()


def md(token: str, tenant_id: str) -> tuple[tuple[str, str], ...]:
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


async def _channels(mesh: Mesh) -> dict[str, grpc.aio.Channel]:
    addrs = {"identity": mesh.identity.address, "orchestrator": mesh.orchestrator.address,
             **{s: mesh.addr(s) for s in ("credentials", "state", "inference", "metering")}}
    return {name: grpc.aio.insecure_channel(addr) for name, addr in addrs.items()}


async def _victim(mesh: Mesh, ch: dict[str, grpc.aio.Channel], b: TenantHandle) -> Ids:
    """One resource of every type for B, made through the public APIs as B."""
    m = b.metadata
    tag = secrets.token_hex(4)
    ident = mesh.identity.stub
    principal = (await ident.CreatePrincipal(idn.CreatePrincipalRequest(
        kind=idn.PRINCIPAL_KIND_SERVICE_ACCOUNT, display_name=f"b-bot-{tag}", scopes=["state.*"]), metadata=m)).principal
    key = (await ident.CreateApiKey(idn.CreateApiKeyRequest(principal_id=principal.id, display_name="b"),
                                    metadata=m)).api_key
    spare = await mesh.identity.login(b.api_key)  # RevokeToken's target: never B's working token

    creds = credentials_pb2_grpc.CredentialsServiceStub(ch["credentials"])
    name = f"b-secret-{tag}"
    await creds.PutSecret(cred.PutSecretRequest(name=name, value=SECRET_VALUE), metadata=m)
    cipher = (await creds.Encrypt(cred.EncryptRequest(plaintext=SECRET_VALUE), metadata=m)).ciphertext

    team = f"b-team-{tag}"
    await mesh.stub.CreateTeam(orch.CreateTeamRequest(team=team_pb(team)), metadata=m)
    run = (await mesh.stub.StartRun(orch.StartRunRequest(team=team, entry_agent="triage", input="b's question",
                                                         idempotency_key=f"b-run-{tag}"), metadata=m)).run

    state = state_pb2_grpc.StateServiceStub(ch["state"])
    thread = f"b-thread-{tag}"
    await state.CreateThread(st.CreateThreadRequest(thread_id=thread, run_id=run.run_id), metadata=m)
    await state.AppendEvents(st.AppendEventsRequest(thread_id=thread, expected_version=0,
                                                    events=[st.NewEvent(type="b", payload=SECRET_VALUE)]), metadata=m)
    await state.CreateSnapshot(st.CreateSnapshotRequest(thread_id=thread, version=1, state=SECRET_VALUE), metadata=m)

    ids = Ids(tenant_id=b.tenant_id, principal_id=principal.id, principal_name=principal.display_name, api_key_id=key.id, jti=spare.jti, secret_name=name,
              ciphertext=cipher, thread_id=thread, context_key=f"b-ctx-{tag}", model_name=f"b-tuned-{tag}",
              team=team, run_id=run.run_id, usage_key=f"b-usage-{tag}", reservation_id="", reserve_key=f"b-res-{tag}",
              lease_id="", run_key=f"b-run-{tag}")
    await state.PutContext(st.PutContextRequest(scope=_scope(ids), key=ids.context_key, value=SECRET_VALUE), metadata=m)

    infer = inference_pb2_grpc.InferenceServiceStub(ch["inference"])
    await infer.RegisterPrivateModel(inf.RegisterPrivateModelRequest(model=inf.PrivateModel(
        name=ids.model_name, upstream_model=f"ft:claude-test:b:{tag}")), metadata=m)
    await infer.CountTokens(inf.CountTokensRequest(params=_params(ids.model_name)), metadata=m)  # B may use it

    meter = metering_pb2_grpc.MeteringServiceStub(ch["metering"])
    await meter.RecordUsage(met.RecordUsageRequest(events=[_usage(ids.usage_key)]), metadata=m)
    held = await meter.ReserveBudget(met.ReserveBudgetRequest(model=MODEL, prompt_tokens=10, max_output_tokens=10,
                                                              idempotency_key=ids.reserve_key), metadata=m)
    lease = (await meter.LeaseBudget(met.LeaseBudgetRequest(model=MODEL, tokens=10), metadata=m)).lease
    return Ids(**{**ids.__dict__, "reservation_id": held.reservation_id, "lease_id": lease.lease_id})


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


_PROBES = {"identity": "/bulkhead.identity.v1.IdentityService/ListPrincipals",
           "metering": "/bulkhead.metering.v1.MeteringService/GetQuotaStatus",
           "credentials": "/bulkhead.credentials.v1.CredentialsService/VerifyAccessEvents",
           "state": "/bulkhead.state.v1.StateService/ListThreads",
           "inference": "/bulkhead.inference.v1.InferenceService/GetModelPolicy",
           "orchestrator": "/bulkhead.orchestrator.v1.OrchestratorService/ListTeams"}


@contextlib.asynccontextmanager
async def running_rig(data_dir: Path) -> AsyncIterator[Rig]:
    """The mesh (runs stay queued: nothing reaches a model), tenants A, B and suspended C, every token."""
    async with FakeAnthropic() as upstream, running_mesh(data_dir, upstream_url=upstream.base_url) as mesh:
        await mesh.orchestrator.dispatcher.stop()
        ch = await _channels(mesh)
        try:
            a, b, c = await asyncio.gather(mesh.tenant(), mesh.tenant(), mesh.tenant())
            rig = Rig(mesh, ch, a, b, await _victim(mesh, ch, b))
            rig.markers = [*rig.b_ids.markers(), SECRET_VALUE]
            rig.tokens.update(await _narrowed(mesh, a))
            key = await mesh.identity.app.keys.active()
            rig.tokens.update({
                "expired": forged.expired(key, a.token),
                "tampered": forged.tampered(a.token, tid=b.tenant_id),
                "alg_none": forged.alg_none(a.token),
                "foreign_key": forged.signed_by_stranger(a.token),
                "unknown_kid": forged.signed_by_stranger(a.token, kid="k" + secrets.token_urlsafe(12)),
            })
            revoked = await mesh.identity.login(a.api_key)
            await mesh.identity.stub.RevokeToken(idn.RevokeTokenRequest(jti=revoked.jti), metadata=a.metadata)
            rig.tokens["revoked"] = revoked.token
            await mesh.identity.stub.UpdateTenantStatus(idn.UpdateTenantStatusRequest(
                tenant_id=c.tenant_id, status=idn.TENANT_STATUS_SUSPENDED), metadata=mesh.identity.operator.metadata)
            rig.suspended = c
            took = await asyncio.gather(_refused_everywhere(ch, md(revoked.token, a.tenant_id), "TOKEN_REVOKED"),
                                        _refused_everywhere(ch, c.metadata, "TENANT_SUSPENDED"))
            rig.propagation = dict(zip(("revoked", "suspended"), took))
            yield rig
        finally:
            for channel in ch.values():
                await channel.close()
