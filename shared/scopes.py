"""The authorization rule each RPC declares in its proto, read from the method descriptor."""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf import descriptor_pool

from bulkhead.common.v1 import auth_pb2

# Infrastructure services that must answer without a token (load balancers, grpcurl).
OPEN_SERVICES = (
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)


@dataclass(frozen=True, slots=True)
class MethodRule:
    """What a caller needs to invoke one method."""

    scope: str
    """The scope the token must hold; empty for public methods."""
    public: bool
    """No token needed (key discovery, token issuance)."""


class RuleBook:
    """Looks up (and caches) the AuthRule of a method path like "/pkg.Service/Method"."""

    def __init__(self, pool: descriptor_pool.DescriptorPool | None = None):
        self._pool = pool or descriptor_pool.Default()
        self._rules: dict[str, MethodRule | None] = {}

    def rule(self, method_path: str) -> MethodRule | None:
        """The rule, or None when the method declares none (callers must refuse it: fail closed)."""
        if method_path not in self._rules:
            self._rules[method_path] = self._load(method_path)
        return self._rules[method_path]

    def _load(self, method_path: str) -> MethodRule | None:
        service_name, _, method_name = method_path.lstrip("/").partition("/")
        if service_name in OPEN_SERVICES:
            return MethodRule(scope="", public=True)
        try:
            method = self._pool.FindServiceByName(service_name).FindMethodByName(method_name)
        except KeyError:
            return None
        if method is None:
            return None
        options = method.GetOptions()
        # The generated auth_pb2.pyi types the extension as a plain FieldDescriptor, not the
        # _ExtensionFieldDescriptor types-protobuf asks for.
        if not options.HasExtension(auth_pb2.auth):  # type: ignore[arg-type]
            return None
        rule: auth_pb2.AuthRule = options.Extensions[auth_pb2.auth]  # type: ignore[index]
        if not rule.public and not rule.scope:
            return None
        return MethodRule(scope=rule.scope, public=rule.public)
