"""What one tenant can see of its own data, per service: the cheap observable for "nothing was written".

Each service's listings, every page, with times left out (reads may touch last-used times). Equal
snapshots before and after a refused write mean it left nothing behind that its tenant can list.
"""

from __future__ import annotations

from google.protobuf import timestamp_pb2
from google.protobuf.json_format import MessageToDict

from bulkhead.credentials.v1 import credentials_pb2 as cred
from bulkhead.identity.v1 import identity_pb2 as idn
from bulkhead.inference.v1 import inference_pb2 as inf
from bulkhead.metering.v1 import metering_pb2 as met
from bulkhead.orchestrator.v1 import orchestrator_pb2 as orch
from bulkhead.state.v1 import state_pb2 as st

from .matrix import invoke
from .methods import Rpc, enumerate_rpcs

_BY_PATH = {r.path: r for r in enumerate_rpcs()}
_I, _C, _S = (
    "/bulkhead.identity.v1.IdentityService/",
    "/bulkhead.credentials.v1.CredentialsService/",
    "/bulkhead.state.v1.StateService/",
)
_N, _O, _M = (
    "/bulkhead.inference.v1.InferenceService/",
    "/bulkhead.orchestrator.v1.OrchestratorService/",
    "/bulkhead.metering.v1.MeteringService/",
)


def _ever() -> met.UsageFilter:
    """Every usage event metering accepts (after the epoch), whenever it says it happened: up to year 9999."""
    return met.UsageFilter(
        start_time=timestamp_pb2.Timestamp(nanos=1000), end_time=timestamp_pb2.Timestamp(seconds=253402300799)
    )


LISTINGS: dict[str, tuple[tuple[str, object], ...]] = {
    "identity": ((_I + "ListPrincipals", idn.ListPrincipalsRequest()),),
    "credentials": ((_C + "ListSecrets", cred.ListSecretsRequest(show_deleted=True)),),
    "state": ((_S + "ListThreads", st.ListThreadsRequest()),),
    "inference": ((_N + "ListPrivateModels", inf.ListPrivateModelsRequest()),),
    "orchestrator": ((_O + "ListTeams", orch.ListTeamsRequest()), (_O + "ListRuns", orch.ListRunsRequest())),
    "metering": (
        (_M + "QueryUsage", met.QueryUsageRequest(filter=_ever(), group_by=[met.USAGE_GROUPING_MODEL])),
        (_M + "GetQuotaStatus", met.GetQuotaStatusRequest()),
    ),
}
"""Service -> the listings that show its tenant's data."""


def _timeless(value):
    if isinstance(value, dict):
        return {k: _timeless(v) for k, v in value.items() if not k.endswith("_time")}
    if isinstance(value, list):
        return [_timeless(v) for v in value]
    return value


async def _pages(channel, rpc: Rpc, request, metadata) -> list:
    out, token = [], ""
    for _ in range(100):
        req = rpc.request_class()()
        req.CopyFrom(request)
        if token:
            req.page_token = token
        got = await invoke(channel, rpc, req, metadata)
        assert got.code == "OK", f"{rpc.path} cannot observe: {got.status} {got.message}"
        reply = MessageToDict(got.replies[0], preserving_proto_field_name=True)
        token = reply.pop("next_page_token", "")
        out.append(_timeless(reply))
        if not token:
            return out
    raise AssertionError(f"{rpc.path}: more than 100 pages")


async def snapshot(channels: dict, service: str, metadata) -> dict:
    """Everything the tenant of metadata can list in service."""
    return {
        path: await _pages(channels[service], _BY_PATH[path], request, metadata) for path, request in LISTINGS[service]
    }


def is_write(rpc: Rpc) -> bool:
    """Whether the method may change its tenant's data (by the verb of its scope)."""
    return rpc.scope.rsplit(".", 1)[-1] not in ("read", "describe", "count")
