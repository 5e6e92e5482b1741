"""The console's only way to the data: the public gRPC APIs, called with one signed-in tenant's token."""

from __future__ import annotations

import uuid
from collections.abc import Mapping

import grpc

from bulkhead.common.v1 import security_events_pb2_grpc
from bulkhead.credentials.v1 import credentials_pb2_grpc
from bulkhead.identity.v1 import identity_pb2_grpc
from bulkhead.inference.v1 import inference_pb2_grpc
from bulkhead.metering.v1 import metering_pb2_grpc
from bulkhead.orchestrator.v1 import orchestrator_pb2_grpc
from bulkhead.state.v1 import state_pb2_grpc
from shared.tls import TlsConfig, channel_credentials

_STUBS = {
    "identity": identity_pb2_grpc.IdentityServiceStub,
    "credentials": credentials_pb2_grpc.CredentialsServiceStub,
    "orchestrator": orchestrator_pb2_grpc.OrchestratorServiceStub,
    "metering": metering_pb2_grpc.MeteringServiceStub,
    "state": state_pb2_grpc.StateServiceStub,
    "inference": inference_pb2_grpc.InferenceServiceStub,
}


class Mesh:
    """One channel per service shared by every session; credentials travel per call, never on the channel."""

    def __init__(self, peers: Mapping[str, str], env: Mapping[str, str]):
        tls = TlsConfig.from_env(env)
        self._channels = {svc: _channel(peers[svc], tls) for svc in _STUBS}
        self.identity = _STUBS["identity"](self._channels["identity"])
        self.credentials = _STUBS["credentials"](self._channels["credentials"])
        self.orchestrator = _STUBS["orchestrator"](self._channels["orchestrator"])
        self.metering = _STUBS["metering"](self._channels["metering"])
        self.state = _STUBS["state"](self._channels["state"])
        self.security_events = {
            svc: security_events_pb2_grpc.SecurityEventsServiceStub(ch) for svc, ch in self._channels.items()
        }
        """Every service's SecurityEventsService (each answers with its own ledger)."""

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()


def call_metadata(token: str, tenant_id: str, request_id: str | None = None) -> tuple[tuple[str, str], ...]:
    """authorization, x-tenant-id and x-request-id for one call made for a session."""
    return (
        ("authorization", f"Bearer {token}"),
        ("x-tenant-id", tenant_id),
        ("x-request-id", request_id or uuid.uuid4().hex),
    )


def _channel(address: str, tls: TlsConfig | None) -> grpc.aio.Channel:
    if tls is not None:
        return grpc.aio.secure_channel(address, channel_credentials(tls))
    return grpc.aio.insecure_channel(address)
