"""Client-chosen identifiers reused across tenants: B uses one first, then A sends the same.

The RPCs are found from the descriptors: every tenant write whose request carries an id-like
field (CLIENT_ID). Each must either have a Reuse (how to make a valid request around a chosen
key) or be listed in NAMES_EXISTING (the field names an existing resource, which the attack
matrix's cross-tenant cell covers). Every Reuse also reuses B's x-request-id.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.json_format import MessageToDict

from bulkhead.credentials.v1 import credentials_pb2 as cred
from bulkhead.identity.v1 import identity_pb2 as idn
from bulkhead.inference.v1 import inference_pb2 as inf
from bulkhead.metering.v1 import metering_pb2 as met
from bulkhead.orchestrator.v1 import orchestrator_pb2 as orch
from bulkhead.state.v1 import state_pb2 as st
from testkit.identity import TenantHandle
from tests.services.orchestrator.mesh import team_pb

from .factories import FACTORIES, MODEL, message_params, usage_event
from .matrix import invoke
from .methods import Rpc, enumerate_rpcs
from .observe import is_write

_REGISTER = "/bulkhead.inference.v1.InferenceService/RegisterPrivateModel"
_SET_QUOTA = "/bulkhead.metering.v1.MeteringService/SetQuota"
_RPC = {r.path: r for r in enumerate_rpcs()}

CLIENT_ID = re.compile(r"^(idempotency_key|request_id|event_id|name|key|display_name|[a-z_]*_id)$")
"""Field names that carry an identifier (a client may choose it, or it names an existing thing)."""


def id_fields(descriptor: Descriptor, prefix: str = "", depth: int = 0) -> list[str]:
    """Dotted paths of the string fields named like identifiers in a request, nested ones too."""
    out = []
    for f in descriptor.fields:
        if f.type == FieldDescriptor.TYPE_STRING and CLIENT_ID.match(f.name):
            out.append(prefix + f.name)
        elif f.message_type is not None and depth < 3 and not f.message_type.full_name.startswith("google."):
            out += id_fields(f.message_type, f"{prefix}{f.name}.", depth + 1)
    return out


@dataclass(frozen=True)
class Reuse:
    """How one RPC is called around a chosen key, by either tenant."""

    build: Callable[[str, dict], object]
    """key, the caller's own prerequisites -> a valid request using key as its client-chosen id."""
    prepare: Callable[[object, TenantHandle, str], Awaitable[dict]] | None = None
    """Makes what the request needs in the caller's own tenant (a team, a principal)."""
    observe: str = ""
    """The service whose listings show the write, when not the RPC's own (usage lands in metering)."""
    key_field: str = ""
    """Which request field carries the key ("" : the key is x-request-id alone)."""
    vary: frozenset[str] = frozenset()
    """Reply fields that differ between any two calls (counters): left out of the shape comparison."""
    compare: bool = True
    """Compare reply shapes at all (off where every call answers something new: fresh key versions)."""
    readback: Callable[[str, dict, object], tuple[str, object]] | None = None
    """key, own prerequisites, the write's reply -> a read (path, request) that finds the write in the
    caller's space, for writes no listing shows."""


async def _principal(rig, t: TenantHandle, key: str) -> dict:
    p = (
        await rig.mesh.identity.stub.CreatePrincipal(
            idn.CreatePrincipalRequest(
                kind=idn.PRINCIPAL_KIND_SERVICE_ACCOUNT, display_name=f"{key}-p", scopes=["state.*"]
            ),
            metadata=t.metadata,
        )
    ).principal
    return {"principal_id": p.id}


async def _model(rig, t: TenantHandle, key: str) -> dict:
    await invoke(
        rig.channels["inference"],
        _RPC[_REGISTER],
        inf.RegisterPrivateModelRequest(
            model=inf.PrivateModel(name=f"{key}-model", upstream_model=f"ft:claude-test:{key}")
        ),
        t.metadata,
    )
    return {"model": f"{key}-model"}


async def _budget(rig, t: TenantHandle, key: str) -> dict:
    """A large token budget, so a reservation shows as held in GetQuotaStatus."""
    await invoke(
        rig.channels["metering"],
        _RPC[_SET_QUOTA],
        met.SetQuotaRequest(
            quota=met.Quota(
                tenant_id=t.tenant_id,
                budgets=[
                    met.Budget(
                        unit=met.BUDGET_UNIT_TOKENS,
                        limit=10**9,
                        mode=met.BUDGET_MODE_HARD,
                        period=met.BUDGET_PERIOD_MONTH,
                    )
                ],
            )
        ),
        rig.mesh.identity.operator.metadata,
    )
    return {}


async def _team(rig, t: TenantHandle, key: str) -> dict:
    await rig.mesh.stub.CreateTeam(orch.CreateTeamRequest(team=team_pb(f"{key}-team")), metadata=t.metadata)
    return {"team": f"{key}-team"}


KEYED: dict[str, Reuse] = {
    "/bulkhead.identity.v1.IdentityService/CreatePrincipal": Reuse(
        lambda k, o: idn.CreatePrincipalRequest(
            kind=idn.PRINCIPAL_KIND_SERVICE_ACCOUNT, display_name=k, scopes=["state.*"]
        ),
        key_field="display_name",
    ),
    "/bulkhead.identity.v1.IdentityService/CreateApiKey": Reuse(
        lambda k, o: idn.CreateApiKeyRequest(principal_id=o["principal_id"], display_name=k),
        prepare=_principal,
        key_field="display_name",
        readback=lambda k, o, r: (
            "/bulkhead.identity.v1.IdentityService/ListApiKeys",
            idn.ListApiKeysRequest(principal_id=o["principal_id"]),
        ),
    ),
    "/bulkhead.credentials.v1.CredentialsService/PutSecret": Reuse(
        lambda k, o: cred.PutSecretRequest(name=k, value=secrets.token_bytes(8)), key_field="name"
    ),
    "/bulkhead.state.v1.StateService/CreateThread": Reuse(
        lambda k, o: st.CreateThreadRequest(thread_id=k, run_id=f"{k}-run", agent_id=f"{k}-agent", labels={k: k}),
        key_field="thread_id",
    ),
    "/bulkhead.state.v1.StateService/PutContext": Reuse(
        lambda k, o: st.PutContextRequest(
            scope=st.ContextScope(kind=st.SCOPE_KIND_TEAM, id=k), key=k, value=secrets.token_bytes(8)
        ),
        key_field="key",
        readback=lambda k, o, r: (
            "/bulkhead.state.v1.StateService/GetContext",
            st.GetContextRequest(scope=st.ContextScope(kind=st.SCOPE_KIND_TEAM, id=k), key=k),
        ),
    ),
    "/bulkhead.inference.v1.InferenceService/RegisterPrivateModel": Reuse(
        lambda k, o: inf.RegisterPrivateModelRequest(
            model=inf.PrivateModel(name=k, upstream_model=f"ft:claude-test:{k}")
        ),
        key_field="model.name",
    ),
    "/bulkhead.inference.v1.InferenceService/CreateMessage": Reuse(
        lambda k, o: inf.CreateMessageRequest(params=message_params(o["model"])), prepare=_model, observe="metering"
    ),
    "/bulkhead.orchestrator.v1.OrchestratorService/CreateTeam": Reuse(
        lambda k, o: orch.CreateTeamRequest(team=team_pb(k)), key_field="team.name"
    ),
    "/bulkhead.orchestrator.v1.OrchestratorService/StartRun": Reuse(
        lambda k, o: orch.StartRunRequest(team=o["team"], entry_agent="triage", input="hi", idempotency_key=k),
        prepare=_team,
        key_field="idempotency_key",
        vary=frozenset({"queue"}),
    ),
    "/bulkhead.metering.v1.MeteringService/RecordUsage": Reuse(
        lambda k, o: met.RecordUsageRequest(events=[usage_event(k)]), key_field="events.idempotency_key"
    ),
    "/bulkhead.metering.v1.MeteringService/ReserveBudget": Reuse(
        lambda k, o: met.ReserveBudgetRequest(model=MODEL, prompt_tokens=10, max_output_tokens=10, idempotency_key=k),
        prepare=_budget,
        key_field="idempotency_key",
    ),
}
"""Writes whose request carries an identifier the client chooses."""

_EXISTING = "names an existing resource of the caller's (the matrix's cross-tenant cell)"
_TAGS = "tags that label the caller's own token or stream, never a key anything is deduplicated by"
NAMES_EXISTING: dict[str, str] = {
    **{f"/bulkhead.identity.v1.IdentityService/{m}": _EXISTING for m in ("DisablePrincipal", "RevokeApiKey")},
    "/bulkhead.identity.v1.IdentityService/ExchangeToken": _TAGS,
    **{
        f"/bulkhead.credentials.v1.CredentialsService/{m}": _EXISTING
        for m in ("RotateSecret", "DeleteSecret", "DestroySecret")
    },
    **{
        f"/bulkhead.state.v1.StateService/{m}": _EXISTING
        for m in ("DeleteThread", "AppendEvents", "CreateSnapshot", "DeleteContext")
    },
    "/bulkhead.inference.v1.InferenceService/StreamMessage": "tool names inside one request; streams are never "
    "replayed by request id (CreateMessage is)",
    **{
        f"/bulkhead.orchestrator.v1.OrchestratorService/{m}": _EXISTING
        for m in ("UpdateTeam", "DeleteTeam", "CancelRun")
    },
    **{
        f"/bulkhead.metering.v1.MeteringService/{m}": _EXISTING
        for m in ("CommitBudget", "ReleaseBudget", "RenewLease", "ReleaseLease")
    },
}


def keyed_rpcs(rpcs: list[Rpc]) -> list[Rpc]:
    """Tenant writes whose request carries an identifier field."""
    return [r for r in rpcs if not r.public and not r.platform and is_write(r) and id_fields(r.descriptor.input_type)]


def unclassified(rpcs: list[Rpc]) -> list[str]:
    """Keyed writes with neither a Reuse nor a reason: what to add, one line each."""
    return [
        f"{r.path} (fields {', '.join(id_fields(r.descriptor.input_type))}): add KEYED[{r.path!r}] = Reuse(...) "
        f"or NAMES_EXISTING[{r.path!r}] = '<why no client chooses it>' in tests/isolation/reuse.py"
        for r in keyed_rpcs(rpcs)
        if r.path not in KEYED and r.path not in NAMES_EXISTING
    ]


def request_id_only(rpcs: list[Rpc]) -> dict[str, Reuse]:
    """Every other write of A's own that the matrix expects to succeed: reused by x-request-id alone."""
    return {
        r.path: Reuse(lambda k, o, t=FACTORIES[r.path]: t.build(_NOBODY), compare=FACTORIES[r.path].compare_reply)
        for r in rpcs
        if r.path in FACTORIES and FACTORIES[r.path].phase == 2 and r.path not in KEYED
    }


class _Nobody:
    def __getattr__(self, name):
        raise AssertionError(f"a request-id-only reuse must not name a resource ({name})")


_NOBODY = _Nobody()


def skeleton(reply, sent: set[str], vary: frozenset[str] = frozenset(), chosen: tuple[str, ...] = ()) -> object:
    """A reply with its strings blanked (<sent> echoed from the request, <made> by the server: ids, times,
    ciphertexts), so replies to different keys compare by shape, counts and flags."""

    def walk(v):
        if isinstance(v, dict):
            return {("<sent>" if _echo(k, sent, chosen) else k): walk(x) for k, x in sorted(v.items()) if k not in vary}
        if isinstance(v, list):
            return [walk(x) for x in v]
        if isinstance(v, str) and not v.lstrip("-").isdigit():
            return "<sent>" if _echo(v, sent, chosen) else "<made>"
        return v

    return walk(MessageToDict(reply, preserving_proto_field_name=True))


def _echo(v: str, sent: set[str], chosen: tuple[str, ...]) -> bool:
    """v came from the caller: sent as is, or derived from a key or request id it chose."""
    return v in sent or any(c in v for c in chosen)


_CLOCK = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
"""A timestamp: the clock made it, not the call (two tenants' calls in the same second carry the same one;
a reply replayed across tenants still shows by the ids only B's call made)."""


def made_values(reply, sent: set[str], chosen: tuple[str, ...] = ()) -> set[str]:
    """Strings in a reply that the caller did not send or choose (what only this call's server made)."""
    out: set[str] = set()

    def walk(v):
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        elif (
            isinstance(v, str)
            and not _echo(v, sent, chosen)
            and len(v) >= 8
            and not v.lstrip("-").isdigit()
            and not _CLOCK.match(v)
        ):
            out.add(v)

    walk(MessageToDict(reply, preserving_proto_field_name=True))
    return out


def strings(request) -> set[str]:
    """Every string value a request carries."""
    out: set[str] = set()

    def walk(v):
        if isinstance(v, dict):
            for k, x in v.items():
                out.add(k)
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        elif isinstance(v, str):
            out.add(v)

    walk(MessageToDict(request, preserving_proto_field_name=True))
    return out


async def call(rig, rpc: Rpc, request, tenant: TenantHandle, request_id: str):
    """rpc as tenant with this x-request-id."""
    return await invoke(rig.channels[rpc.service], rpc, request, (*tenant.metadata, ("x-request-id", request_id)))
