"""Every integer field of every metering and inference request, at extreme values, gets a precise status.

Hypothesis builds requests from the message descriptors (so a new field or RPC is covered by
itself) with integers drawn from the edges that break arithmetic: 2**31, 2**53, 2**62, 2**63-1,
their negatives. The servers run on a loop of their own thread, so Hypothesis drives plain
blocking calls. Never INTERNAL or UNKNOWN; the service answers a valid call afterwards.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bulkhead.inference.v1 import inference_pb2
from bulkhead.metering.v1 import metering_pb2
from shared.errors import MAX_DETAILS_BYTES
from tests.services.inference.helpers import make_templates, start_mesh, stop_mesh

EXAMPLES = int(os.environ.get("BULKHEAD_FUZZ_EXAMPLES", "20"))
_EDGES = [0, 1, -1, 2**31 - 1, -(2**31), 2**53 - 1, 2**53, 2**62, 2**63 - 1, -(2**63)]
_INT64 = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64}
_INT32 = {FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32}
_UINT = {
    FieldDescriptor.TYPE_UINT32: 2**32 - 1,
    FieldDescriptor.TYPE_FIXED32: 2**32 - 1,
    FieldDescriptor.TYPE_UINT64: 2**64 - 1,
    FieldDescriptor.TYPE_FIXED64: 2**64 - 1,
}
_WELL_DEFINED_ONLY = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


def assert_bounded(exc: grpc.RpcError) -> None:
    """An error's details (the google.rpc.Status trailer) take at most 1 KB, its message a few hundred bytes."""
    trailers = dict(exc.trailing_metadata() or ())
    details = trailers.get("grpc-status-details-bin", b"")
    assert len(details) <= MAX_DETAILS_BYTES, f"{len(details)} bytes of details: {exc.details()[:80]}"
    assert len((exc.details() or "").encode()) <= 2 * MAX_DETAILS_BYTES


def _integers(field: FieldDescriptor):
    if field.type in _INT64:
        lo, hi = -(2**63), 2**63 - 1
    elif field.type in _INT32:
        lo, hi = -(2**31), 2**31 - 1
    else:
        lo, hi = 0, _UINT[field.type]
    return st.one_of(st.sampled_from([v for v in _EDGES if lo <= v <= hi]), st.integers(lo, hi))


def _scalar(field: FieldDescriptor):
    if field.type in _INT64 or field.type in _INT32 or field.type in _UINT:
        return _integers(field)
    if field.type == FieldDescriptor.TYPE_STRING:
        return st.sampled_from(["", "x", "claude-test", "t_other", "\u00e9" * 5000])
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type == FieldDescriptor.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values])
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.sampled_from([0.0, 1.0, -1.0, 1e308])
    return None  # bytes: left unset


def message_strategy(descriptor: Descriptor, cls: Callable, depth: int = 0):
    """Requests of one type: every field may be set, integers from the edges, nested messages two deep."""
    fields = {}
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if depth >= 2 or field.message_type.GetOptions().map_entry:
                continue
            sub = message_strategy(field.message_type, _class_of(field.message_type), depth + 1)
        else:
            sub = _scalar(field)
        if sub is None:
            continue
        if field.is_repeated:
            sub = st.lists(sub, max_size=2)
        fields[field.name] = st.one_of(st.none(), sub)

    def build(values: dict):
        msg = cls()
        for name, value in values.items():
            if value is None:
                continue
            field = descriptor.fields_by_name[name]
            if field.is_repeated:
                getattr(msg, name).extend(value)
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                getattr(msg, name).CopyFrom(value)
            else:
                setattr(msg, name, value)
        return msg

    return st.fixed_dictionaries({}, optional=fields).map(build)


def _class_of(descriptor: Descriptor):
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(descriptor)


class _LoopThread:
    """An asyncio loop on its own thread: the servers live there, the test thread makes blocking calls."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def mesh_on_thread(tmp_path_factory):
    """Metering, credentials and one inference proxy (the inference tests' mesh), served from another thread."""
    tmp = tmp_path_factory.mktemp("extreme")
    templates = make_templates(tmp_path_factory.mktemp("extreme-templates"))
    runner = _LoopThread()
    mesh = runner.run(start_mesh(tmp, templates=templates))
    channels = {
        "metering": grpc.insecure_channel(mesh.metering.running.address),
        "inference": grpc.insecure_channel(mesh.proxies[0].service.running.address),
    }
    try:
        yield mesh, channels
    finally:
        for ch in channels.values():
            ch.close()
        runner.run(stop_mesh(mesh))
        runner.close()


def _methods(file_descriptor, service: str):
    svc = file_descriptor.services_by_name[service]
    return [(service, m) for m in svc.methods if not m.client_streaming]


_CASES = _methods(metering_pb2.DESCRIPTOR, "MeteringService") + _methods(inference_pb2.DESCRIPTOR, "InferenceService")


@pytest.mark.parametrize(("service", "method"), _CASES, ids=[f"{s}.{m.name}" for s, m in _CASES])
def test_extreme_integers_get_a_precise_status(mesh_on_thread, service, method):
    """Whatever integers a request carries, the reply is OK or a well-defined error, never INTERNAL."""
    mesh, channels = mesh_on_thread
    channel = channels["metering" if service == "MeteringService" else "inference"]
    request_cls = _class_of(method.input_type)
    response_cls = _class_of(method.output_type)
    path = f"/{method.containing_service.full_name}/{method.name}"
    if method.server_streaming:
        call = channel.unary_stream(
            path, request_serializer=request_cls.SerializeToString, response_deserializer=response_cls.FromString
        )
    else:
        call = channel.unary_unary(
            path, request_serializer=request_cls.SerializeToString, response_deserializer=response_cls.FromString
        )
    tenant_md, operator_md = mesh.md("t_fuzz"), mesh.op()

    @settings(
        max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(request=message_strategy(method.input_type, request_cls), as_operator=st.booleans())
    def attempt(request, as_operator):
        md = operator_md if as_operator else tenant_md
        try:
            reply = call(request, metadata=md, timeout=10)
            if method.server_streaming:
                for _ in reply:
                    pass
        except grpc.RpcError as exc:
            assert exc.code() not in _WELL_DEFINED_ONLY, (
                f"{method.name} answered {exc.code().name} ({exc.details()}) to {request}"
            )
            assert_bounded(exc)

    attempt()
    health = metering_pb2.GetQuotaStatusRequest()
    metering = channels["metering"].unary_unary(
        "/bulkhead.metering.v1.MeteringService/GetQuotaStatus",
        request_serializer=health.SerializeToString,
        response_deserializer=metering_pb2.GetQuotaStatusResponse.FromString,
    )
    assert metering(health, metadata=tenant_md, timeout=10) is not None
