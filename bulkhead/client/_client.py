"""Client: channels to every service with credentials and tracing applied, stubs by service name."""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import grpc

from bulkhead.client._credentials import RefreshingToken
from shared import telemetry
from shared.client import ReadYourWrites
from shared.config import SERVICES, service_addr
from shared.errors import error_details
from shared.service_config import channel_options, channel_target
from shared.tls import TlsConfig, channel_credentials

if TYPE_CHECKING:  # the *AsyncStub classes exist only in the generated .pyi stubs (mypy-protobuf)
    from bulkhead.credentials.v1.credentials_pb2_grpc import CredentialsServiceAsyncStub
    from bulkhead.identity.v1.identity_pb2_grpc import IdentityServiceAsyncStub
    from bulkhead.inference.v1.inference_pb2_grpc import InferenceServiceAsyncStub
    from bulkhead.metering.v1.metering_pb2_grpc import MeteringServiceAsyncStub
    from bulkhead.orchestrator.v1.orchestrator_pb2_grpc import OrchestratorServiceAsyncStub
    from bulkhead.state.v1.state_pb2_grpc import StateServiceAsyncStub

_STUBS = {
    "identity": ("bulkhead.identity.v1.identity_pb2_grpc", "IdentityServiceStub"),
    "credentials": ("bulkhead.credentials.v1.credentials_pb2_grpc", "CredentialsServiceStub"),
    "state": ("bulkhead.state.v1.state_pb2_grpc", "StateServiceStub"),
    "inference": ("bulkhead.inference.v1.inference_pb2_grpc", "InferenceServiceStub"),
    "orchestrator": ("bulkhead.orchestrator.v1.orchestrator_pb2_grpc", "OrchestratorServiceStub"),
    "metering": ("bulkhead.metering.v1.metering_pb2_grpc", "MeteringServiceStub"),
}


class ClientError(Exception):
    """A call failed; str() says what happened and what to do next."""


def describe_error(err: grpc.aio.AioRpcError) -> str:
    """One line for a person: the status, the server's message, and a hint."""
    details = error_details(err)
    reason = details.get("reason")
    hint = {
        grpc.StatusCode.UNAVAILABLE: "is the service running? try `bulkhead up`",
        grpc.StatusCode.UNAUTHENTICATED: "check BULKHEAD_API_KEY, or issue a new token",
    }.get(err.code())
    if reason == "MISSING_SCOPE":  # other refusals (a suspended tenant, ...) say what to do in their message
        hint = "use a key that has this scope; a tenant admin makes one with `bulkhead keys create --scope`"
    text = f"{err.code().name}: {err.details()}"
    if reason and reason not in text:
        text += f" [{reason}]"
    if details.get("bad_request"):
        text += "; " + "; ".join(f"{field}: {why}" for field, why in details["bad_request"].items())
    return f"{text} ({hint})" if hint else text


class Client:
    """One caller's view of the mesh: `client.identity`, `client.credentials`, ... are typed stubs."""

    def __init__(self, credentials: RefreshingToken, channels: dict[str, grpc.aio.Channel]):
        self.auth = credentials
        self._channels = channels
        self._stubs: dict[str, Any] = {}

    @classmethod
    async def connect(
        cls,
        *,
        api_key: str | None = None,
        token: str | None = None,
        tenant_id: str | None = None,
        addresses: Mapping[str, str] | None = None,
        env: Mapping[str, str] = os.environ,
        ttl_seconds: int = 0,
    ) -> Client:
        """Channels to every service (addresses default to BULKHEAD_<SVC>_ADDR) with credentials applied."""
        addresses = {svc: (addresses or {}).get(svc) or service_addr(svc, env) for svc in SERVICES}
        tls = TlsConfig.from_env(env)
        bootstrap = _channel(addresses["identity"], tls, [])
        creds = RefreshingToken(bootstrap, api_key, token=token, tenant_id=tenant_id, ttl_seconds=ttl_seconds)
        interceptors = [*telemetry.client_interceptors(), *creds.interceptors()]
        # A tracker per service: WAL positions of one service's database mean nothing to another's.
        channels = {
            svc: _channel(addr, tls, [*interceptors, *ReadYourWrites().interceptors()])
            for svc, addr in addresses.items()
        }
        channels["_bootstrap"] = bootstrap
        return cls(creds, channels)

    # Typed as the generated async stubs, so mypy checks each call's request and reply types.
    @property
    def identity(self) -> IdentityServiceAsyncStub:
        return self._stub("identity")

    @property
    def credentials(self) -> CredentialsServiceAsyncStub:
        return self._stub("credentials")

    @property
    def state(self) -> StateServiceAsyncStub:
        return self._stub("state")

    @property
    def inference(self) -> InferenceServiceAsyncStub:
        return self._stub("inference")

    @property
    def orchestrator(self) -> OrchestratorServiceAsyncStub:
        return self._stub("orchestrator")

    @property
    def metering(self) -> MeteringServiceAsyncStub:
        return self._stub("metering")

    def _stub(self, service: str) -> Any:
        # Imported on first use: a CLI command that talks to one service loads one service's stubs.
        if service not in self._stubs:
            module, name = _STUBS[service]
            self._stubs[service] = getattr(importlib.import_module(module), name)(self._channels[service])
        return self._stubs[service]

    def channel(self, service: str) -> grpc.aio.Channel:
        """The authenticated channel to one service (for stubs this client does not name)."""
        return self._channels[service]

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _channel(address: str, tls: TlsConfig | None, interceptors: list[Any]) -> grpc.aio.Channel:
    # The same service config as the services' own channels: round_robin over replicas, idempotent calls resent.
    target, options = channel_target(address), channel_options(address)
    if tls is not None:
        return grpc.aio.secure_channel(target, channel_credentials(tls), options=options, interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
