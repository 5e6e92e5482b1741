"""Tenant B's resources: one small factory per resource type, each made through the public APIs as B.

A factory returns the Ids fields of what it made. RESOURCES runs them in order (a run needs its
team, a thread its run). A Target naming a resource type with no factory here fails the matrix.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

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
from testkit.identity import TenantHandle
from tests.services.orchestrator.mesh import Mesh, team_pb

from .factories import MODEL, Ids, context_scope, message_params, usage_event

SECRET_VALUE = b"b-secret-" + secrets.token_hex(8).encode()
"""In B's secret, ciphertext, events, snapshot and context: it must never reach A."""


@dataclass
class Victim:
    """The tenant whose resources are made, and the ids made so far."""

    mesh: Mesh
    channels: dict[str, grpc.aio.Channel]
    tenant: TenantHandle
    tag: str = field(default_factory=lambda: secrets.token_hex(4))
    ids: dict[str, object] = field(default_factory=dict)

    @property
    def md(self) -> tuple[tuple[str, str], ...]:
        return self.tenant.metadata

    def stub(self, service: str, module):
        """A stub of service over its channel, e.g. stub("state", state_pb2_grpc)."""
        return getattr(module, f"{service.capitalize()}ServiceStub")(self.channels[service])


async def _tenant(v: Victim) -> dict:
    return {"tenant_id": v.tenant.tenant_id}


async def _principal(v: Victim) -> dict:
    p = (
        await v.mesh.identity.stub.CreatePrincipal(
            idn.CreatePrincipalRequest(
                kind=idn.PRINCIPAL_KIND_SERVICE_ACCOUNT, display_name=f"b-bot-{v.tag}", scopes=["state.*"]
            ),
            metadata=v.md,
        )
    ).principal
    return {"principal_id": p.id, "principal_name": p.display_name}


async def _api_key(v: Victim) -> dict:
    key = (
        await v.mesh.identity.stub.CreateApiKey(
            idn.CreateApiKeyRequest(principal_id=v.ids["principal_id"], display_name="b"), metadata=v.md
        )
    ).api_key
    return {"api_key_id": key.id}


async def _token(v: Victim) -> dict:
    spare = await v.mesh.identity.login(v.tenant.api_key)  # what A tries to revoke: never B's working token
    return {"jti": spare.jti}


async def _secret(v: Victim) -> dict:
    name = f"b-secret-{v.tag}"
    await v.stub("credentials", credentials_pb2_grpc).PutSecret(
        cred.PutSecretRequest(name=name, value=SECRET_VALUE), metadata=v.md
    )
    return {"secret_name": name}


async def _ciphertext(v: Victim) -> dict:
    out = await v.stub("credentials", credentials_pb2_grpc).Encrypt(
        cred.EncryptRequest(plaintext=SECRET_VALUE), metadata=v.md
    )
    return {"ciphertext": out.ciphertext}


async def _team(v: Victim) -> dict:
    team = f"b-team-{v.tag}"
    await v.mesh.stub.CreateTeam(orch.CreateTeamRequest(team=team_pb(team)), metadata=v.md)
    return {"team": team}


async def _run(v: Victim) -> dict:
    key = f"b-run-{v.tag}"
    run = (
        await v.mesh.stub.StartRun(
            orch.StartRunRequest(team=v.ids["team"], entry_agent="triage", input="b's question", idempotency_key=key),
            metadata=v.md,
        )
    ).run
    return {"run_id": run.run_id, "run_key": key}


async def _thread(v: Victim) -> dict:
    state, thread = v.stub("state", state_pb2_grpc), f"b-thread-{v.tag}"
    await state.CreateThread(st.CreateThreadRequest(thread_id=thread, run_id=v.ids["run_id"]), metadata=v.md)
    await state.AppendEvents(
        st.AppendEventsRequest(
            thread_id=thread, expected_version=0, events=[st.NewEvent(type="b", payload=SECRET_VALUE)]
        ),
        metadata=v.md,
    )
    await state.CreateSnapshot(st.CreateSnapshotRequest(thread_id=thread, version=1, state=SECRET_VALUE), metadata=v.md)
    return {"thread_id": thread}


async def _context(v: Victim) -> dict:
    key = f"b-ctx-{v.tag}"
    await v.stub("state", state_pb2_grpc).PutContext(
        st.PutContextRequest(scope=context_scope(v.ids["team"]), key=key, value=SECRET_VALUE), metadata=v.md
    )
    return {"context_key": key}


async def _private_model(v: Victim) -> dict:
    infer, name = v.stub("inference", inference_pb2_grpc), f"b-tuned-{v.tag}"
    await infer.RegisterPrivateModel(
        inf.RegisterPrivateModelRequest(model=inf.PrivateModel(name=name, upstream_model=f"ft:claude-test:b:{v.tag}")),
        metadata=v.md,
    )
    await infer.CountTokens(inf.CountTokensRequest(params=message_params(name)), metadata=v.md)  # B may use it
    return {"model_name": name}


async def _usage_event(v: Victim) -> dict:
    key = f"b-usage-{v.tag}"
    await v.stub("metering", metering_pb2_grpc).RecordUsage(
        met.RecordUsageRequest(events=[usage_event(key)]), metadata=v.md
    )
    return {"usage_key": key}


async def _reservation(v: Victim) -> dict:
    key = f"b-res-{v.tag}"
    held = await v.stub("metering", metering_pb2_grpc).ReserveBudget(
        met.ReserveBudgetRequest(model=MODEL, prompt_tokens=10, max_output_tokens=10, idempotency_key=key),
        metadata=v.md,
    )
    return {"reservation_id": held.reservation_id, "reserve_key": key}


async def _lease(v: Victim) -> dict:
    lease = (
        await v.stub("metering", metering_pb2_grpc).LeaseBudget(
            met.LeaseBudgetRequest(model=MODEL, tokens=10), metadata=v.md
        )
    ).lease
    return {"lease_id": lease.lease_id}


async def _security_event(v: Victim) -> dict:
    """B's own token claiming another tenant at every service (TENANT_MISMATCH, B's event), flushed to each ledger."""
    import jwt

    from bulkhead.common.v1 import security_events_pb2 as sec
    from bulkhead.common.v1 import security_events_pb2_grpc

    principal = jwt.decode(v.tenant.token, options={"verify_signature": False})["sub"]
    claimed = (("authorization", f"Bearer {v.tenant.token}"), ("x-tenant-id", "t_claimed" + v.tag))
    for channel in v.channels.values():
        try:
            await security_events_pb2_grpc.SecurityEventsServiceStub(channel).ListSecurityEvents(
                sec.ListSecurityEventsRequest(), metadata=claimed
            )
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err
    servers = [s.running for s in v.mesh.services.values()] + [v.mesh.orchestrator.running, v.mesh.identity.app.running]
    for running in servers:
        for work in running.background:
            await work.flush()
    for name, channel in v.channels.items():  # stored: A's attempts must find them, and leave them out
        listed = await security_events_pb2_grpc.SecurityEventsServiceStub(channel).ListSecurityEvents(
            sec.ListSecurityEventsRequest(reasons=["TENANT_MISMATCH"]), metadata=v.md
        )
        assert [e.principal_id for e in listed.events] == [principal], name
    return {"refused_principal": principal}


RESOURCES: dict[str, Callable[[Victim], Awaitable[dict]]] = {
    "tenant": _tenant,
    "principal": _principal,
    "api key": _api_key,
    "token": _token,
    "secret": _secret,
    "ciphertext": _ciphertext,
    "team": _team,
    "run": _run,
    "thread": _thread,
    "context": _context,
    "private model": _private_model,
    "usage event": _usage_event,
    "reservation": _reservation,
    "lease": _lease,
    "security event": _security_event,
}


async def make_victim(mesh: Mesh, channels: dict[str, grpc.aio.Channel], tenant: TenantHandle) -> Ids:
    """One resource of every type for tenant, in RESOURCES order; their ids."""
    victim = Victim(mesh, channels, tenant)
    for make in RESOURCES.values():
        victim.ids.update(await make(victim))
    return Ids(**victim.ids)
