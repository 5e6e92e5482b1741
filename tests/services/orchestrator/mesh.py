"""The real mesh in one process for orchestrator tests: identity, credentials, state, metering,
inference and the orchestrator, each a real gRPC server on port 0 over SQLite in a temp dir.

Tokens are real: tenants are created through identity, every service verifies with identity's
keys, and the orchestrator gets its delegated run tokens from identity's ExchangeToken.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from bulkhead.common.v1 import tenancy_pb2
from bulkhead.orchestrator.v1 import orchestrator_pb2 as pb
from bulkhead.orchestrator.v1 import orchestrator_pb2_grpc
from shared.client import make_channel
from testkit.identity import IdentityHarness, TenantHandle, running_identity

TIERS = {"pooled": tenancy_pb2.TIER_POOLED, "bridge": tenancy_pb2.TIER_BRIDGE, "silo": tenancy_pb2.TIER_SILO}
"""Every isolation tier, by the name tests parametrize over."""


@dataclass
class Mesh:
    """Addresses, the identity harness and an orchestrator stub."""

    identity: IdentityHarness
    env: dict[str, str]
    orchestrator: Any = None
    stub: orchestrator_pb2_grpc.OrchestratorServiceAsyncStub | None = None
    services: dict[str, Any] = field(default_factory=dict)
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    async def tenant(self, tier: str = "pooled") -> TenantHandle:
        """A fresh tenant of `tier` (pooled, bridge or silo) with an admin token."""
        return await self.identity.tenant(f"t-{uuid.uuid4().hex[:8]}", tier=TIERS[tier])

    def verifier(self):
        """A verifier over identity's keys, as every service but identity uses."""
        ch = make_channel(self.identity.address)
        self.channels.append(ch)
        return self.identity.verifier(ch, revocation_poll=0.5)

    def addr(self, name: str) -> str:
        """Where a service listens."""
        return self.env[f"BULKHEAD_{name.upper()}_ADDR"]


@contextlib.asynccontextmanager
async def running_mesh(
    data_dir: Path,
    *,
    with_inference: bool = True,
    upstream_url: str = "",
    orchestrator_env: dict[str, str] | None = None,
    start_orchestrator: bool = True,
    env: dict[str, str] | None = None,
) -> AsyncIterator[Mesh]:
    """Start the services in dependency order, each told where the earlier ones listen (env: more settings
    every service reads, e.g. BULKHEAD_STATE_DATABASE_URL)."""
    extra = env or {}
    async with running_identity(data_dir / "identity") as identity, contextlib.AsyncExitStack() as stack:
        env = {
            "BULKHEAD_DATA_DIR": str(data_dir),
            "BULKHEAD_IDENTITY_ADDR": identity.address,
            "BULKHEAD_STATE_ENCRYPTION": "local",
            "BULKHEAD_SECRETS_BACKEND": "local",
            "BULKHEAD_LOG_LEVEL": "WARNING",
            **extra,
        }
        for svc in ("identity", "credentials", "state", "inference", "orchestrator", "metering"):
            env[f"BULKHEAD_{svc.upper()}_METRICS_PORT"] = "0"
        mesh = Mesh(identity, env)
        stack.push_async_callback(_close_channels, mesh)

        from services.credentials.config import Config as CredentialsConfig
        from services.credentials.server import start as start_credentials

        creds = await start_credentials(CredentialsConfig.from_env(env), mesh.verifier(), address="127.0.0.1:0")
        stack.push_async_callback(creds.stop, 0)
        env["BULKHEAD_CREDENTIALS_ADDR"] = creds.running.address

        from services.metering.server import MIGRATIONS as METERING_MIGRATIONS
        from services.metering.server import serve_metering
        from shared.db import Database

        metering_db = await Database.open(
            f"sqlite+aiosqlite:///{data_dir / 'metering.db'}", migrations=str(METERING_MIGRATIONS)
        )
        metering = await serve_metering(db=metering_db, verifier=mesh.verifier(), address="127.0.0.1:0")
        stack.push_async_callback(metering.stop, 0)
        env["BULKHEAD_METERING_ADDR"] = metering.running.address

        from services.state.config import StateConfig
        from services.state.server import start as start_state

        state = await start_state(StateConfig.from_env(env), mesh.verifier(), address="127.0.0.1:0")
        stack.push_async_callback(state.stop, 0)
        env["BULKHEAD_STATE_ADDR"] = state.running.address
        mesh.services.update(credentials=creds, metering=metering, state=state)

        if with_inference:
            env.update(
                {
                    "BULKHEAD_MODEL_PROVIDER": "anthropic",
                    "ANTHROPIC_BASE_URL": upstream_url,
                    "ANTHROPIC_API_KEY": "sk-platform-test",
                }
            )
            from services.inference.config import InferenceConfig
            from services.inference.server import start as start_inference

            inference = await start_inference(InferenceConfig.from_env(env), mesh.verifier(), address="127.0.0.1:0")
            stack.push_async_callback(inference.stop, 0)
            env["BULKHEAD_INFERENCE_ADDR"] = inference.running.address
            mesh.services["inference"] = inference
        else:
            env["BULKHEAD_INFERENCE_ADDR"] = "127.0.0.1:1"

        env.update(orchestrator_env or {})
        if start_orchestrator:
            await start_orchestrator_in(mesh, stack)
        yield mesh


async def start_orchestrator_in(
    mesh: Mesh, stack: contextlib.AsyncExitStack, *, poll_seconds: float = 0.2, **overrides: str
) -> Any:
    """Start (another) orchestrator replica in this process on port 0 (its dispatcher and WatchRun poll every
    poll_seconds)."""
    from services.orchestrator.config import OrchestratorConfig
    from services.orchestrator.server import start

    env = {
        "BULKHEAD_ORCHESTRATOR_LEASE_SECONDS": "3",
        "BULKHEAD_ORCHESTRATOR_CANARY_KEY": "ab" * 32,
        **mesh.env,
        **overrides,
    }
    orch = await start(
        OrchestratorConfig.from_env(env), mesh.verifier(), address="127.0.0.1:0", poll_seconds=poll_seconds
    )
    stack.push_async_callback(orch.stop, 0)
    channel = grpc.aio.insecure_channel(orch.address)
    mesh.channels.append(channel)
    mesh.orchestrator = orch
    mesh.stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
    return orch


async def _close_channels(mesh: Mesh) -> None:
    for ch in mesh.channels:
        await ch.close()


def team_pb(name: str = "support", *, tool_host: str = "127.0.0.1:9", model: str = "claude-test") -> pb.Team:
    """The two-agent team: triage hands off to billing, which has one HTTP tool with a secret header."""
    from google.protobuf import struct_pb2

    schema = struct_pb2.Struct()
    schema.update({"type": "object", "properties": {"invoice": {"type": "string"}}})
    return pb.Team(
        name=name,
        description="support desk",
        agents=[
            pb.Agent(name="triage", system_prompt="Route the customer.", model=model, handoffs=["billing"]),
            pb.Agent(
                name="billing",
                system_prompt="Answer billing questions.",
                model=model,
                tools=["lookup_invoice", "read_context", "write_context"],
            ),
        ],
        http_tools=[
            pb.HttpTool(
                name="lookup_invoice",
                description="Look up an invoice",
                method="GET",
                url=f"http://{tool_host}/invoices",
                headers={"authorization": "Bearer ${secret:billing_api_key}"},
                input_schema=schema,
            )
        ],
        allowed_hosts=[tool_host],
    )
