"""Every paging RPC accepts only its own page tokens, generated from the descriptors.

Each RPC whose request has a `page_token` field (the six services' own and the common contracts each
service serves) gets a real next_page_token as its lister (tenant B; the platform for platform RPCs),
then presents it to another paging RPC, as tenant A, with one character changed and with other
filters: each is INVALID_ARGUMENT with the one reason INVALID_PAGE_TOKEN. Walking the pages returns
every item once. A new paging RPC without an entry in PAGING fails here saying what to add.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import pytest_asyncio
from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from bulkhead.common.v1 import audit_pb2 as aud
from bulkhead.common.v1 import security_events_pb2 as sec
from bulkhead.credentials.v1 import credentials_pb2 as cred
from bulkhead.identity.v1 import identity_pb2 as idn
from bulkhead.inference.v1 import inference_pb2 as inf
from bulkhead.metering.v1 import metering_pb2 as met
from bulkhead.metering.v1 import metering_pb2_grpc
from bulkhead.orchestrator.v1 import orchestrator_pb2 as orch
from bulkhead.state.v1 import state_pb2 as st
from bulkhead.state.v1 import state_pb2_grpc
from shared.paging import REASON

from .factories import MODEL, Ids
from .matrix import invoke
from .methods import Rpc, enumerate_rpcs
from .resources import make_victim
from .rig import Rig

pytestmark = pytest.mark.asyncio(loop_scope="module")

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
_A, _E = (
    "/bulkhead.common.v1.ConfigAuditService/ListAuditEvents",
    "/bulkhead.common.v1.SecurityEventsService/ListSecurityEvents",
)

_EVER = met.UsageFilter(
    start_time=timestamp_pb2.Timestamp(nanos=1000), end_time=timestamp_pb2.Timestamp(seconds=253402300799)
)


@dataclass(frozen=True)
class Listing:
    """How to list with one paging RPC: the request (filters set) and how to change its filters."""

    request: Callable[[Ids], Message]
    """B's listing (page_size and page_token are set by the test)."""
    refilter: Callable[[Message, Ids], None] | None
    """Changes the request's filters in place; None when the RPC has no filters (said in `why`)."""
    caller: str = "b"
    """Whose listing: "b" (tenant B), "operator" or "service" (a platform service's token)."""
    why: str = ""
    """Why refilter is None."""


def _set(**fields):
    def change(req, _ids):
        for name, value in fields.items():
            if isinstance(value, list):
                del getattr(req, name)[:]
                getattr(req, name).extend(value)
            else:
                setattr(req, name, value)

    return change


_NO_FILTERS = "the request has no filter fields"

PAGING: dict[str, Listing] = {
    _I + "ListTenants": Listing(lambda i: idn.ListTenantsRequest(), None, "operator", _NO_FILTERS),
    _I + "ListPrincipals": Listing(lambda i: idn.ListPrincipalsRequest(), None, why=_NO_FILTERS),
    _I + "ListApiKeys": Listing(lambda i: idn.ListApiKeysRequest(), _set(principal_id="p_other")),
    _I + "ListRetentionPolicies": Listing(lambda i: idn.ListRetentionPoliciesRequest(), None, "service", _NO_FILTERS),
    _C + "ListSecrets": Listing(lambda i: cred.ListSecretsRequest(), _set(show_deleted=True)),
    _C + "ListAccessEvents": Listing(lambda i: cred.ListAccessEventsRequest(), _set(secret_name="other")),
    _S + "ListThreads": Listing(lambda i: st.ListThreadsRequest(), _set(agent_id="other")),
    _S + "ReadEvents": Listing(
        lambda i: st.ReadEventsRequest(thread_id=i.thread_id),
        lambda req, i: setattr(req, "thread_id", i.thread_id + "-2"),
    ),
    _N + "ListPrivateModels": Listing(lambda i: inf.ListPrivateModelsRequest(), None, why=_NO_FILTERS),
    _O + "ListTeams": Listing(lambda i: orch.ListTeamsRequest(), None, why=_NO_FILTERS),
    _O + "ListRuns": Listing(lambda i: orch.ListRunsRequest(), _set(team="other")),
    _M + "QueryUsage": Listing(
        lambda i: met.QueryUsageRequest(filter=_EVER, group_by=[met.USAGE_GROUPING_DAY]),
        _set(group_by=[met.USAGE_GROUPING_HOUR]),
    ),
    _M + "QueryTenantUsage": Listing(
        lambda i: met.QueryTenantUsageRequest(tenant_id=i.tenant_id, filter=_EVER, group_by=[met.USAGE_GROUPING_DAY]),
        _set(group_by=[met.USAGE_GROUPING_HOUR]),
        "operator",
    ),
    _M + "ListPrices": Listing(lambda i: met.ListPricesRequest(), _set(model="other")),
    **{
        f"{svc}:{_A}": Listing(lambda i: aud.ListAuditEventsRequest(), _set(action="other"))
        for svc in ("identity", "orchestrator", "metering", "inference")
    },
    **{
        f"{svc}:{_E}": Listing(lambda i: sec.ListSecurityEventsRequest(), _set(reasons=["MISSING_SCOPE"]))
        for svc in ("identity", "credentials", "state", "inference", "orchestrator", "metering")
    },
}
"""Every paging RPC (Rpc.key) -> how B lists with it."""

RPCS = [r for r in enumerate_rpcs() if "page_token" in r.descriptor.input_type.fields_by_name]


async def test_every_paging_rpc_has_a_listing():
    """A paging RPC added to a proto fails here until PAGING says how to list with it."""
    missing = [r for r in RPCS if r.key not in PAGING]
    assert not missing, "\n".join(
        f"  add PAGING[{r.key!r}] = Listing(lambda i: {r.descriptor.input_type.name}(<filters for B>), "
        f"_set(<a filter>=<another value>)) in tests/isolation/test_page_tokens.py"
        for r in missing
    )
    assert not set(PAGING) - {r.key for r in RPCS}, "PAGING names RPCs that do not page"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def seeded(rig: Rig):
    """B with at least two of everything each listing shows, and the platform's tokens."""
    second = await make_victim(rig.mesh, rig.channels, rig.b)  # a second of every resource
    state = state_pb2_grpc.StateServiceStub(rig.channels["state"])
    await state.AppendEvents(
        st.AppendEventsRequest(
            thread_id=rig.b_ids.thread_id,
            events=[st.NewEvent(type="b", payload=b"2"), st.NewEvent(type="b", payload=b"3")],
        ),
        metadata=rig.b.metadata,
    )
    await state.CreateThread(st.CreateThreadRequest(thread_id=rig.b_ids.thread_id + "-2"), metadata=rig.b.metadata)
    now = timestamp_pb2.Timestamp()
    now.GetCurrentTime()
    await metering_pb2_grpc.MeteringServiceStub(rig.channels["metering"]).RecordUsage(
        met.RecordUsageRequest(
            events=[
                met.UsageEvent(
                    idempotency_key=f"page-{rig.b.tenant_id}-{d}",
                    model=MODEL,
                    tokens=met.TokenCounts(input_tokens=1, output_tokens=1),
                    occur_time=timestamp_pb2.Timestamp(seconds=now.seconds - d * 86400),
                )
                for d in (1, 2)
            ]
        ),
        metadata=rig.b.metadata,
    )
    metering = metering_pb2_grpc.MeteringServiceStub(rig.channels["metering"])
    operator = rig.mesh.identity.operator.metadata
    for n in (1, 2):  # two price versions (the table is the platform's), two audited quota changes for B
        await metering.SetPrice(
            met.SetPriceRequest(
                price=met.Price(
                    model="page-token-model",
                    effective_time=timestamp_pb2.Timestamp(seconds=now.seconds - n * 3600),
                    input_micros_per_mtok=n,
                    output_micros_per_mtok=n,
                )
            ),
            metadata=operator,
        )
        await metering.SetQuota(
            met.SetQuotaRequest(quota=met.Quota(tenant_id=rig.b.tenant_id, requests_per_minute=1000 + n)),
            metadata=operator,
        )
    narrowed = await rig.mesh.identity.login(rig.b.api_key, scopes=("metering.prices.read",))
    from bulkhead.common.v1 import security_events_pb2_grpc

    for channel in rig.channels.values():  # a second kind of refusal for B at every service
        with contextlib.suppress(Exception):  # refused on purpose (MISSING_SCOPE)
            await security_events_pb2_grpc.SecurityEventsServiceStub(channel).ListSecurityEvents(
                sec.ListSecurityEventsRequest(),
                metadata=(("authorization", f"Bearer {narrowed.token}"), ("x-tenant-id", rig.b.tenant_id)),
            )
    servers = [s.running for s in rig.mesh.services.values()] + [
        rig.mesh.orchestrator.running,
        rig.mesh.identity.app.running,
    ]
    for running in servers:
        for work in running.background:
            if hasattr(work, "flush"):
                await work.flush()
    svc_key = rig.mesh.identity.service_key_file("metering").read_text().strip()
    return {
        "b": rig.b.metadata,
        "a": rig.a.metadata,
        "operator": rig.mesh.identity.operator.metadata,
        "service": (await rig.mesh.identity.login(svc_key)).metadata,
        "second": second,
    }


def _request(rpc: Rpc, ids: Ids, *, size: int = 0, token: str = "") -> Message:
    req = PAGING[rpc.key].request(ids)
    req.page_size, req.page_token = size, token
    return req


def _items(rpc: Rpc, reply: Message) -> list[bytes]:
    """The listed items of a reply (its first repeated message field), each serialized."""
    field = next(
        f
        for f in rpc.descriptor.output_type.fields
        if f.message_type
        and f.message_type.full_name != "google.protobuf.Timestamp"
        and (f.is_repeated if hasattr(f, "is_repeated") else f.label == f.LABEL_REPEATED)
    )
    return [m.SerializeToString(deterministic=True) for m in getattr(reply, field.name)]


async def _call(rig: Rig, rpc: Rpc, request: Message, md):
    return await invoke(rig.channels[rpc.service], rpc, request, md)


async def _first_token(rig: Rig, rpc: Rpc, md) -> str:
    out = await _call(rig, rpc, _request(rpc, rig.b_ids, size=1), md)
    assert out.code == "OK", f"{rpc.key}: {out.status} {out.message}"
    token = out.replies[0].next_page_token
    assert token, f"{rpc.key}: its lister has fewer than two items: seed more in the `seeded` fixture"
    return token


@pytest.mark.parametrize("rpc", RPCS, ids=lambda r: r.key)
async def test_walking_pages_returns_every_item_once(rig: Rig, seeded, rpc: Rpc):
    """Pages of one item each, followed to the end, list exactly what one big page lists."""
    md = seeded[PAGING[rpc.key].caller]
    whole = await _call(rig, rpc, _request(rpc, rig.b_ids, size=500), md)
    assert whole.code == "OK", f"{rpc.key}: {whole.status} {whole.message}"
    walked, token = [], ""
    for _ in range(600):
        out = await _call(rig, rpc, _request(rpc, rig.b_ids, size=1, token=token), md)
        assert out.code == "OK", f"{rpc.key}: {out.status} {out.message}"
        walked += _items(rpc, out.replies[0])
        token = out.replies[0].next_page_token
        if not token:
            break
    assert len(walked) >= 2 and len(set(walked)) == len(walked)
    assert sorted(walked) == sorted(_items(rpc, whole.replies[0]))


def _refused(rpc_key: str, how: str, out) -> None:
    assert (out.code, out.details.get("reason")) == ("INVALID_ARGUMENT", REASON), (
        f"{rpc_key} ({how}): {out.code} {out.details.get('reason')} {out.message}"
    )
    assert "first page" in out.message


def _flip(token: str) -> str:
    i = len(token) // 2
    return token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1 :]


@pytest.mark.parametrize("rpc", RPCS, ids=lambda r: r.key)
async def test_a_page_token_is_accepted_only_by_its_own_rpc_tenant_and_filters(rig: Rig, seeded, rpc: Rpc):
    """Another RPC's token, another tenant, one changed character and other filters: INVALID_PAGE_TOKEN."""
    listing = PAGING[rpc.key]
    md = seeded[listing.caller]
    token = await _first_token(rig, rpc, md)
    # (a) every other paging RPC refuses it, called by a caller of the same tenant (B, or the platform)
    platform = listing.caller != "b"
    others = [r for r in RPCS if r.key != rpc.key and (PAGING[r.key].caller != "b") == platform]
    assert others
    for other in others:
        _refused(
            f"{rpc.key} -> {other.key}",
            "another RPC's token",
            await _call(rig, other, _request(other, rig.b_ids, size=1, token=token), seeded[PAGING[other.key].caller]),
        )
    # (b) another tenant: A presents B's token (platform RPCs refuse every tenant before paging)
    if listing.caller == "b":
        _refused(rpc.key, "tenant A", await _call(rig, rpc, _request(rpc, rig.b_ids, size=1, token=token), seeded["a"]))
    # (c) one character changed
    _refused(rpc.key, "tampered", await _call(rig, rpc, _request(rpc, rig.b_ids, size=1, token=_flip(token)), md))
    # (d) other filters
    if listing.refilter is not None:
        req = _request(rpc, rig.b_ids, size=1, token=token)
        listing.refilter(req, rig.b_ids)
        _refused(rpc.key, "other filters", await _call(rig, rpc, req, md))
    else:
        assert listing.why
    # and the token still works where it belongs
    ok = await _call(rig, rpc, _request(rpc, rig.b_ids, size=1, token=token), md)
    assert ok.code == "OK", f"{rpc.key}: {ok.status} {ok.message}"
