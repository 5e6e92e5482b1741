"""Fuzzing every tenant RPC with requests and metadata derived from the descriptors (issue 15, item 2).

Each RPC gets a tenant of its own (so its listings change only through its own calls) and
BULKHEAD_FUZZ_EXAMPLES examples (default 6 in CI; raise it locally for a longer hunt). Every answer
must be a well-defined status with details under the trailer limit; a refused write must leave the
tenant's listings as they were; every service must still be SERVING (and answer) afterwards.
"""

from __future__ import annotations

import os

import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.errors import MAX_DETAILS_BYTES

from .conftest import FUZZED, FUZZED_RPCS
from .factories import FACTORIES
from .matrix import Outcome, invoke
from .methods import enumerate_rpcs
from .observe import is_write, snapshot
from .rig import md
from .strategies import extra_metadata, messages, mutations, odd_bearers, odd_tenants

pytestmark = pytest.mark.asyncio(loop_scope="module")

EXAMPLES = int(os.environ.get("BULKHEAD_FUZZ_EXAMPLES", "6"))
WELL_DEFINED = {
    "OK",
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "FAILED_PRECONDITION",
    "PERMISSION_DENIED",
    "ABORTED",
    "ALREADY_EXISTS",
    "RESOURCE_EXHAUSTED",
    "UNAUTHENTICATED",
    "OUT_OF_RANGE",
}
"""What a caller may be told; never INTERNAL or UNKNOWN (a crash), nor a timeout (a hang)."""

RPCS = [r for r in enumerate_rpcs() if not r.platform]  # platform RPCs refuse every tenant before any handler
TENANT_RPCS = [r for r in RPCS if not r.public]
_FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=False,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _name(rpc) -> str:
    return rpc.path.rsplit("/", 2)[-2].split(".")[-1].removesuffix("Service").lower() + "." + rpc.path.rsplit("/", 1)[1]


@pytest_asyncio.fixture(loop_scope="module")
async def tenant(rig):
    """A fresh tenant for one RPC's examples: its listings move only with this test's own calls."""
    return await rig.mesh.tenant()


def _count(kind: str, rpc, out: Outcome) -> None:
    FUZZED[(kind, out.status)] += 1
    FUZZED_RPCS[kind].add(rpc.path)


def check_answer(rpc, out: Outcome) -> None:
    """A well-defined status, details that fit the trailer limit."""
    assert out.code in WELL_DEFINED, f"{rpc.path} answered {out.status}: {out.message!r}"
    assert out.details_bytes <= MAX_DETAILS_BYTES, f"{rpc.path}: {out.details_bytes} B of error details"


async def serving(rig, service: str) -> bool:
    """The service's gRPC health check says SERVING."""
    reply = await health_pb2_grpc.HealthStub(rig.channels[service]).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("rpc", RPCS, ids=_name)
@_FUZZ
@given(data=st.data())
async def test_fuzzed_requests_get_well_defined_answers(rig, tenant, rpc, data):
    """Random requests of every field shape (or valid ones with fields redrawn), as a valid tenant:
    well-defined statuses, no partial writes."""
    shapes = messages(rpc.descriptor.input_type)
    if rpc.path in FACTORIES:  # half the examples start from a valid request naming ids that exist nowhere
        shapes = st.one_of(shapes, mutations(FACTORIES[rpc.path].build(rig.b_ids.lookalike())))
    await fuzz_one(rig, tenant, rpc, data.draw(shapes, label="request"))


async def fuzz_one(rig, tenant, rpc, request) -> Outcome:
    """Send one request as tenant; check the answer, and for a refused write that nothing changed."""
    metadata, write = tenant.metadata, is_write(rpc) and not rpc.public
    before = await snapshot(rig.channels, rpc.service, metadata) if write else None
    out = await invoke(rig.channels[rpc.service], rpc, request, () if rpc.public else metadata, timeout=5)
    check_answer(rpc, out)
    _count("request", rpc, out)
    if write and out.code != "OK":
        after = await snapshot(rig.channels, rpc.service, metadata)
        assert after == before, f"{rpc.path} refused ({out.status}) yet changed the tenant's data"
    return out


def _metadata_cases(tenant):
    """Valid identity plus odd extras, or an odd bearer, or an odd tenant; with the expected code family."""
    valid = md(tenant.token, tenant.tenant_id)
    tags = st.lists(
        st.tuples(
            st.sampled_from(["x-request-id", "x-agent-id", "x-run-id", "traceparent"]),
            st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=300),
        ),
        max_size=4,
        unique_by=lambda kv: kv[0],
    )
    ok = st.tuples(st.just(None), st.builds(lambda t, e: (*valid, *t, *e), tags, extra_metadata()))
    bad_bearer = st.tuples(
        st.just({"UNAUTHENTICATED"}),
        st.builds(
            lambda b, e: (("authorization", b), ("x-tenant-id", tenant.tenant_id), *e),
            odd_bearers(tenant.token),
            extra_metadata(),
        ),
    )
    bad_tenant = st.tuples(
        st.just({"UNAUTHENTICATED", "PERMISSION_DENIED"}),
        st.builds(
            lambda t, e: (("authorization", f"Bearer {tenant.token}"), ("x-tenant-id", t), *e),
            odd_tenants(tenant.tenant_id),
            extra_metadata(),
        ),
    )
    return st.one_of(ok, bad_bearer, bad_tenant)


@pytest.mark.parametrize("rpc", TENANT_RPCS, ids=_name)
@_FUZZ
@given(data=st.data())
async def test_fuzzed_metadata_gets_well_defined_answers(rig, tenant, rpc, data):
    """Odd extra keys and values, malformed bearers, odd x-tenant-id: refused precisely, never a crash."""
    expect, metadata = data.draw(_metadata_cases(tenant), label="metadata")
    out = await invoke(rig.channels[rpc.service], rpc, rpc.request_class()(), metadata, timeout=5)
    check_answer(rpc, out)
    _count("metadata", rpc, out)
    if expect is not None:
        assert out.code in expect, f"{rpc.path} with {metadata!r}: {out.status}, expected one of {expect}"


async def test_every_service_is_healthy_and_answers_after_the_fuzzing(rig):
    """After all of the above: SERVING, and tenant B's ordinary calls still work everywhere."""
    from .rig import _PROBES

    for service, path in _PROBES.items():
        assert await serving(rig, service), service
        rpc = next(r for r in RPCS if r.path == path)
        out = await invoke(rig.channels[service], rpc, rpc.request_class()(), rig.b.metadata)
        assert out.code == "OK", (path, out.status, out.message)


async def test_the_fuzzer_reaches_every_tenant_rpc_of_the_six_services():
    """Nothing is skipped silently: all six services, every method that is not operator-only."""
    assert {r.service for r in RPCS} == {"identity", "credentials", "state", "inference", "orchestrator", "metering"}
    assert len(TENANT_RPCS) == len([r for r in enumerate_rpcs() if not r.public and not r.platform])


# The checks above, each shown to fail when what it guards is broken.
_BY_PATH = {r.path: r for r in RPCS}
_QUERY_USAGE, _PUT_SECRET = (
    "/bulkhead.metering.v1.MeteringService/QueryUsage",
    "/bulkhead.credentials.v1.CredentialsService/PutSecret",
)


async def test_a_handler_crash_fails_the_fuzz_check(rig, tenant, monkeypatch):
    """Metering's timestamp check undone (the bug the fuzzer found): the answer is INTERNAL and the check says so."""
    from google.protobuf.timestamp_pb2 import Timestamp

    from bulkhead.metering.v1 import metering_pb2 as met
    from services.metering import wire

    request = met.QueryUsageRequest(
        filter=met.UsageFilter(start_time=Timestamp(seconds=-62135596801), end_time=Timestamp(seconds=1))
    )
    fixed = await fuzz_one(rig, tenant, _BY_PATH[_QUERY_USAGE], request)
    assert fixed.status == "INVALID_ARGUMENT/INVALID_TIMESTAMP"
    monkeypatch.setattr(wire, "micros", lambda ts, present, field="": ts.ToMicroseconds() if present else 0)
    with pytest.raises(AssertionError, match="answered INTERNAL"):
        await fuzz_one(rig, tenant, _BY_PATH[_QUERY_USAGE], request)


async def test_oversized_error_details_fail_the_fuzz_check(rig, tenant, monkeypatch):
    """The trailer is measured as sent: with a limit below a real refusal's details, the check fails."""
    from bulkhead.credentials.v1 import credentials_pb2 as cred

    out = await fuzz_one(rig, tenant, _BY_PATH[_PUT_SECRET], cred.PutSecretRequest(name="", value=b"x"))
    assert out.code == "INVALID_ARGUMENT" and 0 < out.details_bytes <= MAX_DETAILS_BYTES
    monkeypatch.setitem(globals(), "MAX_DETAILS_BYTES", out.details_bytes - 1)
    with pytest.raises(AssertionError, match="B of error details"):
        await fuzz_one(rig, tenant, _BY_PATH[_PUT_SECRET], cred.PutSecretRequest(name="", value=b"x"))


async def test_a_write_that_fails_after_writing_fails_the_fuzz_check(rig, tenant, monkeypatch):
    """PutSecret made to store the secret and then refuse: the listing moved, and the check says so."""
    from bulkhead.credentials.v1 import credentials_pb2 as cred
    from services.credentials.secret_manager import SecretManager
    from shared.errors import InvalidArgument

    original = SecretManager.put

    async def put_then_refuse(self, *args, **kwargs):
        await original(self, *args, **kwargs)
        raise InvalidArgument("refused after writing", reason="INVALID_ARGUMENT")

    monkeypatch.setattr(SecretManager, "put", put_then_refuse)
    with pytest.raises(AssertionError, match="yet changed the tenant's data"):
        await fuzz_one(rig, tenant, _BY_PATH[_PUT_SECRET], cred.PutSecretRequest(name="half-written", value=b"x"))


async def test_a_service_accepting_odd_bearers_fails_the_metadata_check(rig, tenant):
    """The metadata cases' expectations are real: a malformed bearer is expected UNAUTHENTICATED, and is."""
    from hypothesis import find

    expect, metadata = find(_metadata_cases(tenant), lambda c: c[0] == {"UNAUTHENTICATED"})
    rpc = _BY_PATH["/bulkhead.state.v1.StateService/ListThreads"]
    refused = await invoke(rig.channels["state"], rpc, rpc.request_class()(), metadata)
    assert refused.code in expect
    accepted = await invoke(rig.channels["state"], rpc, rpc.request_class()(), tenant.metadata)
    assert accepted.code not in expect  # what a service ignoring the bearer would answer: outside the expectation


def _string_paths(message, prefix: str = "", depth: int = 0):
    """(path, parent getter, name) for every string field of message (repeated too), nested messages too."""
    for field in message.DESCRIPTOR.fields:
        if field.type == field.TYPE_STRING:
            yield prefix + field.name, (lambda m: m), field.name
        elif (
            field.type == field.TYPE_MESSAGE
            and not field.is_repeated
            and depth < 3
            and not field.message_type.full_name.startswith("google.")
        ):
            for path, get, name in _string_paths(getattr(message, field.name), f"{prefix}{field.name}.", depth + 1):
                yield path, (lambda m, g=get, f=field.name: g(getattr(m, f))), name


_WIDE = "\U0001f600" * 1500  # 4-byte characters: the error message is clipped by characters, the trailer by bytes


async def test_every_string_field_long_and_multibyte_keeps_error_details_small(rig, tenant):
    """Deterministic sweep: each string field of each valid request set to 1500 four-byte characters."""
    problems = []
    for rpc in TENANT_RPCS:
        if rpc.path not in FACTORIES:
            continue
        base = FACTORIES[rpc.path].build(rig.b_ids.lookalike())
        for path, get, name in list(_string_paths(base)):
            request = type(base)()
            request.CopyFrom(base)
            parent = get(request)
            if isinstance(getattr(parent, name), str):
                setattr(parent, name, _WIDE)
            else:  # repeated: one wide element first, the valid ones after
                values = [_WIDE, *getattr(parent, name)]
                del getattr(parent, name)[:]
                getattr(parent, name).extend(values)
            out = await invoke(rig.channels[rpc.service], rpc, request, tenant.metadata, timeout=5)
            if out.code not in WELL_DEFINED or out.details_bytes > MAX_DETAILS_BYTES:
                problems.append(f"{rpc.path} {path}: {out.status}, {out.details_bytes} B of details")
    assert not problems, "\n".join(problems)
