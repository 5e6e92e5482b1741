"""A service that is not in the protos, as a new RPC would look in the descriptor pool."""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor

from bulkhead.common.v1 import auth_pb2


def widget_file() -> FileDescriptor:
    """bulkhead.fake.v1.WidgetService: GetWidget (tenant scope, no factory) and ListWidgets (public)."""
    pool = descriptor_pool.DescriptorPool()  # its own pool: the default one stays as generated
    for dep in (descriptor_pb2.DESCRIPTOR, auth_pb2.DESCRIPTOR):
        proto = descriptor_pb2.FileDescriptorProto()
        dep.CopyToProto(proto)
        pool.Add(proto)
    f = descriptor_pb2.FileDescriptorProto(
        name="bulkhead/fake/v1/fake.proto",
        package="bulkhead.fake.v1",
        syntax="proto3",
        dependency=[auth_pb2.DESCRIPTOR.name],
    )
    for name in ("GetWidgetRequest", "GetWidgetResponse"):
        f.message_type.add(name=name)
    service = f.service.add(name="WidgetService")
    for method, rule in (
        ("GetWidget", auth_pb2.AuthRule(scope="state.widgets.read")),
        ("ListWidgets", auth_pb2.AuthRule(public=True)),
    ):
        m = service.method.add(
            name=method,
            input_type=".bulkhead.fake.v1.GetWidgetRequest",
            output_type=".bulkhead.fake.v1.GetWidgetResponse",
        )
        m.options.Extensions[auth_pb2.auth].CopyFrom(rule)
    pool.Add(f)
    return pool.FindFileByName(f.name)
