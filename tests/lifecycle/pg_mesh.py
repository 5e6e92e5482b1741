"""The six services in this process on one real Postgres cluster (a database per service, app role
under RLS) with credentials on OpenBao and state's data keys from credentials' Transit keys: the
production wiring, so crypto-shredding is tested end to end."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from testkit.identity import running_identity
from tests.services.orchestrator.mesh import Mesh, _close_channels, start_orchestrator_in

SERVICES = ("credentials", "state", "metering", "inference", "orchestrator")


@contextlib.asynccontextmanager
async def running_pg_mesh(data_dir: Path, postgres, openbao, upstream_url: str) -> AsyncIterator[Mesh]:
    """identity first, then every other service told where the earlier ones listen."""
    urls = {s: await postgres.create_database(f"lc_{s}") for s in ("identity", *SERVICES)}
    async with (
        running_identity(
            data_dir / "identity", database_url=urls["identity"].app_url, owner_url=urls["identity"].owner_url
        ) as identity,
        contextlib.AsyncExitStack() as stack,
    ):
        env = {
            "BULKHEAD_DATA_DIR": str(data_dir),
            "BULKHEAD_IDENTITY_ADDR": identity.address,
            "BULKHEAD_STATE_ENCRYPTION": "credentials",
            "BULKHEAD_SECRETS_BACKEND": "vault",
            "BULKHEAD_VAULT_ADDR": openbao.url,
            "BULKHEAD_VAULT_TOKEN": openbao.root_token,
            "BULKHEAD_LOG_LEVEL": "WARNING",
            "BULKHEAD_MODEL_PROVIDER": "anthropic",
            "ANTHROPIC_BASE_URL": upstream_url,
            "ANTHROPIC_API_KEY": "sk-platform-test",
        }
        for svc in ("identity", *SERVICES):
            env[f"BULKHEAD_{svc.upper()}_METRICS_PORT"] = "0"
        for svc in SERVICES:
            env[f"BULKHEAD_{svc.upper()}_DATABASE_URL"] = urls[svc].app_url
            env[f"BULKHEAD_{svc.upper()}_DATABASE_OWNER_URL"] = urls[svc].owner_url
        mesh = Mesh(identity, env)
        stack.push_async_callback(_close_channels, mesh)

        from services.credentials.config import Config as CredentialsConfig
        from services.credentials.server import start as start_credentials
        from services.inference.config import InferenceConfig
        from services.inference.server import start as start_inference
        from services.metering.config import MeteringConfig
        from services.metering.server import start as start_metering
        from services.state.config import StateConfig
        from services.state.server import start as start_state

        starts = (
            (
                "credentials",
                lambda: start_credentials(CredentialsConfig.from_env(env), mesh.verifier(), address="127.0.0.1:0"),
            ),
            ("metering", lambda: start_metering(MeteringConfig.from_env(env), mesh.verifier(), address="127.0.0.1:0")),
            ("state", lambda: start_state(StateConfig.from_env(env), mesh.verifier(), address="127.0.0.1:0")),
            (
                "inference",
                lambda: start_inference(InferenceConfig.from_env(env), mesh.verifier(), address="127.0.0.1:0"),
            ),
        )
        for name, start in starts:
            service = await start()
            stack.push_async_callback(service.stop, 0)
            env[f"BULKHEAD_{name.upper()}_ADDR"] = service.running.address
            mesh.services[name] = service
        await start_orchestrator_in(mesh, stack)
        yield mesh
