"""Every RPC of the six services, read from the generated descriptors: nothing here is hand-listed.

Common contracts (bulkhead.common.v1) that several services serve are enumerated once per serving
service, from the list their shared module keeps (COMMON_CONTRACTS)."""

from __future__ import annotations

import importlib
from collections.abc import Collection
from dataclasses import dataclass

from google.protobuf import message_factory
from google.protobuf.descriptor import FileDescriptor, MethodDescriptor

from bulkhead.common.v1 import auth_pb2
from shared.config_audit import SERVED_BY as CONFIG_AUDIT_SERVERS
from shared.security_events import SERVED_BY as SECURITY_EVENTS_SERVERS

SERVICES = ("identity", "credentials", "state", "inference", "orchestrator", "metering")
COMMON_CONTRACTS = {
    "bulkhead.common.v1.audit_pb2": CONFIG_AUDIT_SERVERS,
    "bulkhead.common.v1.security_events_pb2": SECURITY_EVENTS_SERVERS,
}
"""Generated module of a common contract -> the services that serve it (tenant-scoped ones only: the
platform-only TenantLifecycleService is refused to every tenant before any handler)."""


@dataclass(frozen=True)
class Rpc:
    """One method as the matrix sees it."""

    service: str
    """Folder name of the service that serves it (where to send the call)."""
    path: str
    """"/pkg.Service/Method", the gRPC path and the key of FACTORIES."""
    scope: str
    """The scope its AuthRule declares; empty for public methods and for methods with no rule."""
    public: bool
    """Needs no token (key discovery, token issuance): nothing to attack."""
    descriptor: MethodDescriptor

    @property
    def platform(self) -> bool:
        """Operator or platform-service only: no tenant may call it."""
        return self.scope.startswith("platform.")

    @property
    def key(self) -> str:
        """How the matrix names it: the path, prefixed by the serving service for a common contract."""
        return self.path if self.path.startswith(f"/bulkhead.{self.service}.") else f"{self.service}:{self.path}"

    @property
    def shape(self) -> str:
        """unary_unary, unary_stream, stream_unary or stream_stream."""
        d = self.descriptor
        return f"{'stream' if d.client_streaming else 'unary'}_{'stream' if d.server_streaming else 'unary'}"

    def request_class(self):
        """The generated class of its request message."""
        return message_factory.GetMessageClass(self.descriptor.input_type)

    def response_class(self):
        """The generated class of its response message."""
        return message_factory.GetMessageClass(self.descriptor.output_type)


def service_files() -> dict[str, FileDescriptor]:
    """Service folder -> the generated file descriptor that declares its API."""
    return {svc: importlib.import_module(f"bulkhead.{svc}.v1.{svc}_pb2").DESCRIPTOR for svc in SERVICES}


def enumerate_rpcs(files: dict[str, FileDescriptor] | None = None) -> list[Rpc]:
    """Every method of every service in files (default: the six), with its declared rule."""
    out = []
    pairs = list((files or service_files()).items())
    if files is None:
        pairs += [
            (svc, importlib.import_module(module).DESCRIPTOR)
            for module, servers in COMMON_CONTRACTS.items()
            for svc in servers
        ]
    for svc, file in pairs:
        for service in file.services_by_name.values():
            for method in service.methods:
                options = method.GetOptions()
                rule = options.Extensions[auth_pb2.auth] if options.HasExtension(auth_pb2.auth) else None
                out.append(
                    Rpc(
                        svc,
                        f"/{service.full_name}/{method.name}",
                        rule.scope if rule else "",
                        bool(rule and rule.public),
                        method,
                    )
                )
    return out


class MissingFactory(AssertionError):
    """A tenant-scoped RPC the matrix cannot attack because no factory builds its resource."""


def require_factories(rpcs: list[Rpc], factories: dict, resources: Collection[str]) -> None:
    """Fail naming every tenant-scoped RPC without a factory (or whose resource has none), saying what to add."""
    unmade = sorted({t.resource for t in factories.values() if t.resource is not None and t.resource not in resources})
    if unmade:
        raise MissingFactory(
            "requests name resource types no factory makes for tenant B: "
            + ", ".join(unmade)
            + ": add RESOURCES['<type>'] = async def (victim) -> {<Ids field>: <id>} in "
            "tests/isolation/resources.py"
        )
    missing = [r for r in rpcs if not r.public and not r.platform and r.path not in factories]
    if missing:
        lines = [
            f"  {r.path} (scope {r.scope or 'NONE'}): add FACTORIES[{r.path!r}] = Target('<resource type>', "
            f"lambda i: {r.descriptor.input_type.name}(<field>=i.<B's resource id>)) in "
            "tests/isolation/factories.py (a new resource type also needs a field in Ids and a factory in "
            "tests/isolation/resources.py)"
            for r in missing
        ]
        raise MissingFactory(
            "tenant-scoped RPCs with no resource factory, so no cross-tenant proof:\n" + "\n".join(lines)
        )
