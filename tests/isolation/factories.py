"""For every tenant-scoped RPC, a valid request naming one of tenant B's resources.

FACTORIES maps every tenant-scoped RPC to a Target whose build(ids) makes a valid request naming
the resource in ids (B's own are made by the factories in resources.py). The matrix builds it
twice, with B's real ids and with random lookalikes, sends both as tenant A, and requires the same
reply. A new tenant-scoped RPC with no entry here fails the matrix (see methods.require_factories).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, fields

from google.protobuf import timestamp_pb2

from bulkhead.common.v1 import audit_pb2 as aud
from bulkhead.common.v1 import security_events_pb2 as sec
from bulkhead.credentials.v1 import credentials_pb2 as cred
from bulkhead.identity.v1 import identity_pb2 as idn
from bulkhead.inference.v1 import inference_pb2 as inf
from bulkhead.metering.v1 import metering_pb2 as met
from bulkhead.orchestrator.v1 import orchestrator_pb2 as orch
from bulkhead.state.v1 import state_pb2 as st
from shared.ids import is_tenant_id
from tests.services.orchestrator.mesh import team_pb

MODEL = "claude-test"


@dataclass(frozen=True)
class Ids:
    """The identifiers of one tenant's resources, every one a request may name."""

    tenant_id: str
    principal_id: str
    principal_name: str
    api_key_id: str
    jti: str
    secret_name: str
    ciphertext: bytes
    thread_id: str
    context_key: str
    model_name: str
    team: str
    run_id: str
    usage_key: str
    reservation_id: str
    reserve_key: str
    lease_id: str
    run_key: str
    refused_principal: str
    """B's admin principal, whose refused calls every service's security-events ledger holds."""

    def lookalike(self) -> Ids:
        """Random ids of the same shapes: what a resource that exists nowhere is called."""
        ids = Ids(**{f.name: _lookalike(getattr(self, f.name)) for f in fields(self)})
        # The one tenant-id rule (shared.ids): a made-up tenant passes it, so a refusal is never "malformed".
        assert is_tenant_id(self.tenant_id) and is_tenant_id(ids.tenant_id), (self.tenant_id, ids.tenant_id)
        return ids

    def markers(self) -> list[bytes]:
        """Byte strings that must never appear in another tenant's reply."""
        return [v if isinstance(v, bytes) else v.encode() for v in (getattr(self, f.name) for f in fields(self)) if v]


_HEX, _BASE32 = set("0123456789abcdef"), set("abcdefghijklmnopqrstuvwxyz234567")


def _lookalike(value):
    """value with its tail after the last "_" redrawn character by character from the same class
    (hex stays hex, base32 stays base32, punctuation stays): it passes the same validation."""
    if isinstance(value, bytes):  # same length and prefix, random tail: undecryptable by anyone
        keep = max(len(value) - 24, 0)
        return value[:keep] + secrets.token_hex(12).encode()[: len(value) - keep]
    head, sep, tail = value.rpartition("_")
    letters, digits = (
        ("abcdef", "0123456789")
        if set(tail) <= _HEX
        else ("abcdefghijklmnopqrstuvwxyz", "234567")
        if set(tail) <= _BASE32
        else ("abcdefghijklmnopqrstuvwxyz", "0123456789")
    )

    def redraw(c: str) -> str:
        if c.isdigit():
            return secrets.choice(digits)
        if c.isalpha():
            drawn = secrets.choice(letters)
            return drawn.upper() if c.isupper() else drawn
        return c

    return head + sep + "".join(map(redraw, tail))


@dataclass(frozen=True)
class Target:
    """How to attack one RPC across tenants."""

    resource: str | None
    """The resource type the request names (a key of resources.RESOURCES); None: tenant-wide, names none."""
    build: Callable[[Ids], object]
    """A valid request naming the resource in ids."""
    absent: bool = False
    """A's reply for B's resource must be NOT_FOUND or PERMISSION_DENIED (B's thing is invisible);
    otherwise it must be OK (A's own namespace, listing or write) or exactly `refused`."""
    refused: str = ""
    """The CODE/REASON A gets for B's resource where that is neither of the above (undecryptable input)."""
    phase: int = 1
    """When to attack: 0 reads A's own history (before A's attempts on B's ids fill it), 1 reads and
    mutations that must find nothing, 2 creates something of A's (after every read, so A's own copies
    never look like B's)."""
    compare_reply: bool = True
    """Compare successful replies too (off where two calls differ anyway: counters, fresh key versions)."""


def _now(offset: int = 0) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromSeconds(int(time.time()) + offset)
    return ts


def context_scope(team: str) -> st.ContextScope:
    """The context shared by one team's agents."""
    return st.ContextScope(kind=st.SCOPE_KIND_TEAM, id=team)


def message_params(model: str) -> inf.MessageParams:
    """A one-line question to model."""
    return inf.MessageParams(
        model=model,
        max_tokens=16,
        messages=[inf.Message(role=inf.ROLE_USER, content=[inf.ContentBlock(text=inf.TextBlock(text="hi"))])],
    )


def usage_event(key: str) -> met.UsageEvent:
    """A small usage event with idempotency key."""
    return met.UsageEvent(
        idempotency_key=key, model=MODEL, tokens=met.TokenCounts(input_tokens=3, output_tokens=2), occur_time=_now()
    )


_I, _C, _S = (
    "/bulkhead.identity.v1.IdentityService/",
    "/bulkhead.credentials.v1.CredentialsService/",
    "/bulkhead.state.v1.StateService/",
)
_A = "/bulkhead.common.v1.ConfigAuditService/"
_E = "/bulkhead.common.v1.SecurityEventsService/"
_N, _O, _M = (
    "/bulkhead.inference.v1.InferenceService/",
    "/bulkhead.orchestrator.v1.OrchestratorService/",
    "/bulkhead.metering.v1.MeteringService/",
)

FACTORIES: dict[str, Target] = {
    # identity
    _I + "GetTenant": Target("tenant", lambda i: idn.GetTenantRequest(tenant_id=i.tenant_id), absent=True),
    _I + "GetRetentionPolicy": Target(
        "tenant", lambda i: idn.GetRetentionPolicyRequest(tenant_id=i.tenant_id), absent=True
    ),
    # Served by every service that keeps a configuration chain (methods.COMMON_CONTRACTS).
    _A + "ListAuditEvents": Target("tenant", lambda i: aud.ListAuditEventsRequest(tenant_id=i.tenant_id), absent=True),
    _A + "VerifyAuditEvents": Target(
        "tenant", lambda i: aud.VerifyAuditEventsRequest(tenant_id=i.tenant_id), absent=True
    ),
    # Served by every service (methods.COMMON_CONTRACTS). Phase 0: A has no TENANT_MISMATCH of its own yet
    # (the spoofed_tenant attack makes some), while B's are in every ledger: A must see an empty list.
    _E + "ListSecurityEvents": Target(
        "security event", lambda i: sec.ListSecurityEventsRequest(reasons=["TENANT_MISMATCH"]), phase=0
    ),
    _I + "CreatePrincipal": Target(
        "principal",
        lambda i: idn.CreatePrincipalRequest(
            kind=idn.PRINCIPAL_KIND_SERVICE_ACCOUNT, display_name=i.principal_name, scopes=["state.*"]
        ),
        phase=2,
    ),
    _I + "GetPrincipal": Target(
        "principal", lambda i: idn.GetPrincipalRequest(principal_id=i.principal_id), absent=True
    ),
    _I + "ListPrincipals": Target(None, lambda i: idn.ListPrincipalsRequest()),
    _I + "DisablePrincipal": Target(
        "principal", lambda i: idn.DisablePrincipalRequest(principal_id=i.principal_id), absent=True
    ),
    _I + "CreateApiKey": Target(
        "principal", lambda i: idn.CreateApiKeyRequest(principal_id=i.principal_id, display_name="matrix"), absent=True
    ),
    _I + "ListApiKeys": Target("principal", lambda i: idn.ListApiKeysRequest(principal_id=i.principal_id)),
    _I + "RevokeApiKey": Target("api key", lambda i: idn.RevokeApiKeyRequest(api_key_id=i.api_key_id), absent=True),
    _I + "ExchangeToken": Target(
        None, lambda i: idn.ExchangeTokenRequest(scopes=["state.threads.read"]), phase=2, compare_reply=False
    ),
    _I + "RevokeToken": Target("token", lambda i: idn.RevokeTokenRequest(jti=i.jti), absent=True),
    # credentials
    _C + "PutSecret": Target("secret", lambda i: cred.PutSecretRequest(name=i.secret_name, value=b"matrix-a"), phase=2),
    _C + "GetSecret": Target("secret", lambda i: cred.GetSecretRequest(name=i.secret_name), absent=True),
    _C + "ListSecrets": Target(None, lambda i: cred.ListSecretsRequest(show_deleted=True)),
    _C + "DescribeSecret": Target("secret", lambda i: cred.DescribeSecretRequest(name=i.secret_name), absent=True),
    _C + "RotateSecret": Target("secret", lambda i: cred.RotateSecretRequest(name=i.secret_name), absent=True),
    _C + "DeleteSecret": Target("secret", lambda i: cred.DeleteSecretRequest(name=i.secret_name), absent=True),
    _C + "DestroySecret": Target("secret", lambda i: cred.DestroySecretRequest(name=i.secret_name), absent=True),
    _C + "ListAccessEvents": Target(
        "secret", lambda i: cred.ListAccessEventsRequest(secret_name=i.secret_name), phase=0
    ),
    _C + "VerifyAccessEvents": Target(None, lambda i: cred.VerifyAccessEventsRequest(), compare_reply=False),
    _C + "Encrypt": Target(None, lambda i: cred.EncryptRequest(plaintext=b"matrix"), phase=2, compare_reply=False),
    _C + "Decrypt": Target(
        "ciphertext",
        lambda i: cred.DecryptRequest(ciphertext=i.ciphertext),
        refused="INVALID_ARGUMENT/DECRYPTION_FAILED",
    ),
    _C + "GenerateDataKey": Target(None, lambda i: cred.GenerateDataKeyRequest(bits=256), phase=2, compare_reply=False),
    _C + "RotateKey": Target(None, lambda i: cred.RotateKeyRequest(), phase=2, compare_reply=False),
    _C + "Rewrap": Target(
        "ciphertext",
        lambda i: cred.RewrapRequest(ciphertext=i.ciphertext),
        refused="INVALID_ARGUMENT/DECRYPTION_FAILED",
    ),
    # state
    _S + "CreateThread": Target("thread", lambda i: st.CreateThreadRequest(thread_id=i.thread_id), phase=2),
    _S + "GetThread": Target("thread", lambda i: st.GetThreadRequest(thread_id=i.thread_id), absent=True),
    _S + "ListThreads": Target("thread", lambda i: st.ListThreadsRequest(run_id=i.run_id)),
    _S + "DeleteThread": Target("thread", lambda i: st.DeleteThreadRequest(thread_id=i.thread_id), absent=True),
    _S + "AppendEvents": Target(
        "thread",
        lambda i: st.AppendEventsRequest(
            thread_id=i.thread_id, expected_version=1, events=[st.NewEvent(type="matrix", payload=b"a")]
        ),
        absent=True,
    ),
    _S + "ReadEvents": Target("thread", lambda i: st.ReadEventsRequest(thread_id=i.thread_id), absent=True),
    _S + "Replay": Target("thread", lambda i: st.ReplayRequest(thread_id=i.thread_id), absent=True),
    _S + "CreateSnapshot": Target(
        "thread", lambda i: st.CreateSnapshotRequest(thread_id=i.thread_id, version=1, state=b"a"), absent=True
    ),
    _S + "GetSnapshot": Target(
        "thread", lambda i: st.GetSnapshotRequest(thread_id=i.thread_id, at_or_before_version=1), absent=True
    ),
    _S + "PutContext": Target(
        "context", lambda i: st.PutContextRequest(scope=context_scope(i.team), key=i.context_key, value=b"a"), phase=2
    ),
    _S + "GetContext": Target(
        "context", lambda i: st.GetContextRequest(scope=context_scope(i.team), key=i.context_key), absent=True
    ),
    _S + "DeleteContext": Target(
        "context", lambda i: st.DeleteContextRequest(scope=context_scope(i.team), key=i.context_key), absent=True
    ),
    # inference
    _N + "CreateMessage": Target(
        "private model", lambda i: inf.CreateMessageRequest(params=message_params(i.model_name)), absent=True
    ),
    _N + "StreamMessage": Target(
        "private model", lambda i: inf.StreamMessageRequest(params=message_params(i.model_name)), absent=True
    ),
    _N + "CountTokens": Target(
        "private model", lambda i: inf.CountTokensRequest(params=message_params(i.model_name)), absent=True
    ),
    _N + "GetModelPolicy": Target(None, lambda i: inf.GetModelPolicyRequest()),
    _N + "RegisterPrivateModel": Target(
        "private model",
        lambda i: inf.RegisterPrivateModelRequest(
            model=inf.PrivateModel(name=i.model_name, upstream_model="ft:claude-test:a:001")
        ),
        phase=2,
    ),
    _N + "ListPrivateModels": Target(None, lambda i: inf.ListPrivateModelsRequest()),
    # orchestrator
    _O + "CreateTeam": Target("team", lambda i: orch.CreateTeamRequest(team=team_pb(i.team)), phase=2),
    _O + "GetTeam": Target("team", lambda i: orch.GetTeamRequest(name=i.team), absent=True),
    _O + "ListTeams": Target(None, lambda i: orch.ListTeamsRequest()),
    _O + "UpdateTeam": Target(
        "team",
        lambda i: orch.UpdateTeamRequest(
            team=replace_description(team_pb(i.team)), update_mask={"paths": ["description"]}
        ),
        absent=True,
    ),
    _O + "DeleteTeam": Target("team", lambda i: orch.DeleteTeamRequest(name=i.team), absent=True),
    _O + "StartRun": Target(
        "team",
        lambda i: orch.StartRunRequest(team=i.team, entry_agent="triage", input="hi", idempotency_key=i.run_key),
        absent=True,
    ),
    _O + "GetRun": Target("run", lambda i: orch.GetRunRequest(run_id=i.run_id), absent=True),
    _O + "ListRuns": Target("team", lambda i: orch.ListRunsRequest(team=i.team)),
    _O + "WatchRun": Target("run", lambda i: orch.WatchRunRequest(run_id=i.run_id), absent=True),
    _O + "CancelRun": Target("run", lambda i: orch.CancelRunRequest(run_id=i.run_id), absent=True),
    _O + "GetRunStats": Target(None, lambda i: orch.GetRunStatsRequest(start_time=_now(-3600), end_time=_now(3600))),
    # metering
    _M + "RecordUsage": Target(
        "usage event", lambda i: met.RecordUsageRequest(events=[usage_event(i.usage_key)]), phase=2
    ),
    _M + "QueryUsage": Target(
        "principal",
        lambda i: met.QueryUsageRequest(
            filter=met.UsageFilter(start_time=_now(-3600), end_time=_now(3600), principal_id=i.principal_id)
        ),
    ),
    _M + "ListPrices": Target(None, lambda i: met.ListPricesRequest(model=MODEL)),
    _M + "GetQuotaStatus": Target(None, lambda i: met.GetQuotaStatusRequest()),
    _M + "ReserveBudget": Target(
        "reservation",
        lambda i: met.ReserveBudgetRequest(
            model=MODEL, prompt_tokens=10, max_output_tokens=10, idempotency_key=i.reserve_key
        ),
        phase=2,
    ),
    _M + "CommitBudget": Target(
        "reservation",
        lambda i: met.CommitBudgetRequest(reservation_id=i.reservation_id, usage=met.TokenCounts(input_tokens=1)),
        absent=True,
    ),
    _M + "ReleaseBudget": Target(
        "reservation", lambda i: met.ReleaseBudgetRequest(reservation_id=i.reservation_id), absent=True
    ),
    _M + "LeaseBudget": Target(
        None, lambda i: met.LeaseBudgetRequest(model=MODEL, tokens=10), phase=2, compare_reply=False
    ),
    _M + "RenewLease": Target("lease", lambda i: met.RenewLeaseRequest(lease_id=i.lease_id), absent=True),
    _M + "ReleaseLease": Target("lease", lambda i: met.ReleaseLeaseRequest(lease_id=i.lease_id), absent=True),
}


def replace_description(team):
    """The same team with another description (a minimal valid update)."""
    team.description = "changed by the attack matrix"
    return team
