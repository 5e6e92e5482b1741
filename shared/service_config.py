"""The gRPC service config of every channel we open: round_robin over all of a target's addresses, and
retries on UNAVAILABLE for exactly the methods the protos mark idempotent.

The retry list comes from `google.protobuf.MethodOptions.idempotency_level` in the descriptors, so a
client in another language reads the same rule from the same protos; nothing here names a method.
"""

from __future__ import annotations

import functools
import importlib
import ipaddress
import json
from collections.abc import Iterable

from google.protobuf.descriptor import FileDescriptor, MethodDescriptor
from google.protobuf.descriptor_pb2 import MethodOptions

from shared.config import SERVICES

RETRY_POLICY = {
    "maxAttempts": 5,  # gRPC caps attempts at 5 anyway
    "initialBackoff": "0.1s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
"""Up to 4 resends over about 1.5 s of backoff: enough to reach another replica after one dies, short
enough that a service that is down everywhere still fails fast."""

RETRY_THROTTLING = {"maxTokens": 100, "tokenRatio": 0.1}
"""Per channel: retries stop while failures outnumber successes ~10:1 (a service down everywhere), so
retries never multiply an outage's load; a single replica's death costs far fewer tokens than 50."""

MAX_RECONNECT_BACKOFF_MS = 5000
"""Longest wait between a channel's attempts to reconnect to a replica that went away."""

RETRYABLE = (MethodOptions.NO_SIDE_EFFECTS, MethodOptions.IDEMPOTENT)


def _service_files() -> list[FileDescriptor]:
    return [importlib.import_module(f"bulkhead.{svc}.v1.{svc}_pb2").DESCRIPTOR for svc in SERVICES]


def retryable_methods(files: Iterable[FileDescriptor] | None = None) -> list[MethodDescriptor]:
    """The methods whose proto says a repeat is safe (NO_SIDE_EFFECTS or IDEMPOTENT)."""
    return [
        method
        for file in (_service_files() if files is None else files)
        for service in file.services_by_name.values()
        for method in service.methods
        if method.GetOptions().idempotency_level in RETRYABLE
    ]


def service_config(files: Iterable[FileDescriptor] | None = None) -> dict:
    """The service config as a dict: round_robin for every call, a retry policy for the idempotent ones."""
    names = [{"service": m.containing_service.full_name, "method": m.name} for m in retryable_methods(files)]
    return {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [{"name": names, "retryPolicy": RETRY_POLICY}] if names else [],
        "retryThrottling": RETRY_THROTTLING,
    }


@functools.cache
def service_config_json() -> str:
    """service_config() of our six services, as the JSON the `grpc.service_config` channel option takes."""
    return json.dumps(service_config())


def channel_target(address: str) -> str:
    """A gRPC target for BULKHEAD_<SVC>_ADDR: one host:port, a URI (dns:///svc:50052), or a comma-separated
    list of IP:port, which becomes an `ipv4:`/`ipv6:` target that round_robin spreads calls over."""
    parts = [p.strip() for p in address.split(",") if p.strip()]
    if len(parts) <= 1 or ":/" in address or address.startswith(("ipv4:", "ipv6:", "unix:")):
        return parts[0] if len(parts) == 1 else address
    families = {_ip_family(p) for p in parts}
    if len(families) != 1 or None in families:
        raise ValueError(
            f"several addresses must all be IPv4 or all IPv6 literals with ports, got {address!r}; "
            "for host names use one DNS name that resolves to every replica (dns:///name:port)"
        )
    return f"{families.pop()}:{','.join(parts)}"


def _ip_family(host_port: str) -> str | None:
    host = host_port.rpartition(":")[0].strip("[]")
    try:
        return "ipv4" if ipaddress.ip_address(host).version == 4 else "ipv6"
    except ValueError:
        return None


def channel_options(address: str) -> tuple[tuple[str, object], ...]:
    """Channel options for address: our service config, a short reconnect backoff, and for a list of replicas
    the first one as authority (the name TLS checks the certificate against; a list is no host name)."""
    options: tuple[tuple[str, object], ...] = (
        ("grpc.service_config", service_config_json()),
        # A restarted replica rejoins round_robin within seconds, not after gRPC's default 120 s reconnect backoff.
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
        # Each channel its own connections: by default gRPC shares one subchannel per address across a
        # process's channels, so a new channel to a server now listening on a port where another one died
        # fails at once with the old "connection refused" while any channel to the dead one is still open.
        ("grpc.use_local_subchannel_pool", 1),
    )
    target = channel_target(address)
    if target != address.strip() and target.startswith(("ipv4:", "ipv6:")):
        options += (("grpc.default_authority", target.split(":", 1)[1].split(",")[0]),)
    return options
