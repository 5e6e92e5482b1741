"""The inference proxy's configuration, read from the environment (passed in, so tests inject it).

| variable | default | meaning |
|---|---|---|
| BULKHEAD_MODEL_PROVIDER | offline without ANTHROPIC_API_KEY, else anthropic | `offline` (deterministic, no network) or `anthropic` |
| ANTHROPIC_API_KEY | unset | the platform's provider key (tenants may bring their own via credentials) |
| ANTHROPIC_BASE_URL | the SDK's default | upstream Messages API base URL |
| BULKHEAD_INFERENCE_UPSTREAM_TIMEOUT | 600 | seconds per upstream request |
| BULKHEAD_INFERENCE_MAX_ATTEMPTS | 3 | upstream attempts for retry-safe failures (429, 5xx, refused connections) |
| BULKHEAD_INFERENCE_MAX_RETRY_WAIT | 5 | longest retry-after the proxy waits out itself (seconds) |
| BULKHEAD_INFERENCE_ALLOWED_MODELS | claude-sonnet-4-5,claude-haiku-4-5,claude-opus-4-1 | platform default allowlist |
| BULKHEAD_INFERENCE_DEFAULT_MODEL | claude-sonnet-4-5 | platform default model |
| BULKHEAD_INFERENCE_PINNED_VERSIONS | sonnet/haiku/opus aliases -> dated versions | `alias=version,...` |
| BULKHEAD_INFERENCE_MAX_TOKENS_CEILING | 8192 | platform max_tokens ceiling |
| BULKHEAD_INFERENCE_LEASE_TOKENS | 20000 | budget slice a replica leases at a time |
| BULKHEAD_INFERENCE_USAGE_FLUSH_SECONDS | 0.2 | longest a usage event waits in memory before it is sent to metering (a batch of 200 goes at once) |
| BULKHEAD_INFERENCE_PROVIDER_KEY_SECRET | anthropic-api-key | credentials secret that holds a tenant's own key |
| BULKHEAD_INFERENCE_USER_ID_SALT | a random secret made once and kept in `$BULKHEAD_DATA_DIR/inference-user-id.salt` (0600) | key of the opaque per-tenant id sent upstream as metadata.user_id, of the prompt-cache partition marker and of attempt ids; never a public value. Replicas that do not share a data dir should all get the same value from a secret store, so a tenant's cached prompts and upstream id stay the same whichever replica serves it |
| BULKHEAD_INFERENCE_SERVICE_KEY_FILE | $BULKHEAD_DATA_DIR/service-keys/inference.key | the proxy's own platform key (identity writes it on first start): lets usage held in the outbox reach metering after its tenant's token is gone |
| BULKHEAD_INFERENCE_ALLOW_HTTP_ENDPOINTS | 0 | 1 lets private models name plain-http endpoints (tests, local gateways); else https only |
| BULKHEAD_INFERENCE_REPLICA_ID | host name and port | this replica's name in the attempt journal: a process restarted under the same name settles what its predecessor left at once |
| BULKHEAD_INFERENCE_ATTEMPT_SWEEP_SECONDS | upstream timeout + 60 | age after which any replica settles another's unsettled attempts (at their reservation when their usage was never written) |
| BULKHEAD_INFERENCE_WORKERS | 1 | proxy processes serving the one address (SO_REUSEPORT; the kernel spreads connections over them): throughput grows with cores. Each has its own leases, holder name and attempt-journal replica (`<replica id>-w<i>`); only the first serves metrics |
| BULKHEAD_INFERENCE_UPSTREAM_TRANSPORT | sdk | `sdk`: the anthropic SDK, through its aiohttp transport (`anthropic[aiohttp]`; its httpx one when aiohttp is missing); `sdk-httpx`: the SDK on its httpx stack; `direct`: unary calls on the proxy's own kept-alive HTTP/1.1 pool (opt-in) |
| BULKHEAD_INFERENCE_LEASE_IDLE_SECONDS | 0.5 | a budget lease with no call in flight for this long goes back to metering |
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from services.inference.policy import Policy
from services.inference.providers import ANTHROPIC, OFFLINE
from shared.config import EnvReader, ServiceConfig

_PINNED = (
    "claude-sonnet-4-5=claude-sonnet-4-5-20250929,claude-haiku-4-5=claude-haiku-4-5-20251001,"
    "claude-opus-4-1=claude-opus-4-1-20250805"
)


@dataclass(frozen=True)
class InferenceConfig:
    """Everything the inference proxy reads from its environment."""

    service: ServiceConfig
    """Address, database, peers, telemetry."""
    provider: str
    """`offline` or `anthropic`."""
    anthropic_api_key: str = field(default="", repr=False)
    """The platform's provider key (never logged)."""
    anthropic_base_url: str | None = None
    """Upstream base URL; None means the SDK's default."""
    upstream_timeout: float = 600.0
    """Seconds per upstream request."""
    max_attempts: int = 3
    """Upstream attempts for retry-safe failures."""
    max_retry_wait: float = 5.0
    """Longest upstream retry-after the proxy waits out before giving up with RESOURCE_EXHAUSTED."""
    platform_policy: Policy = field(default_factory=Policy)
    """Defaults for every tenant's policy."""
    lease_tokens: int = 20_000
    """Budget slice leased at a time."""
    usage_flush_seconds: float = 0.2
    """Longest a usage event waits before delivery; longer means fewer, larger RecordUsage batches."""
    provider_key_secret: str = "anthropic-api-key"
    """Credentials secret name of a tenant's own key."""
    user_id_salt: str | None = field(default=None, repr=False)
    """Key of the opaque tenant id sent upstream (and of the prompt-cache partition); None: the
    deployment's own secret, made once in the data dir (load_or_create_salt)."""
    allow_http_endpoints: bool = False
    """Whether private models may name plain-http endpoints (a tenant's key would cross the wire in clear)."""
    replica_id: str = ""
    """This replica's name in the attempt journal (empty: host name and port)."""
    attempt_sweep_seconds: float = 660.0
    """Age after which unsettled attempts of any replica are settled by whoever sweeps."""
    lease_idle_seconds: float = 0.5
    """A lease with nothing in flight for this long is returned, so other replicas can use its rest."""
    workers: int = 1
    """Processes serving the one address (SO_REUSEPORT when more than one)."""
    upstream_transport: str = "sdk"
    """How unary calls reach the upstream: "sdk" (the default: the official anthropic SDK builds each
    request and reads each reply, its requests, errors and headers the provider's own, carried on the
    proxy's kept-alive pool through the SDK's http_client hook), "sdk-aiohttp" (the SDK on its aiohttp
    transport, anthropic.DefaultAioHttpClient, when installed: about a quarter of a millisecond more per
    call), "sdk-httpx" (the SDK on its default httpx stack: about twice the CPU per call) or "direct"
    (upstream_http.UpstreamPool written by the proxy itself, less CPU again; opt-in, since it bypasses
    the SDK). Streams and token counts always go through the SDK on its own transport."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> InferenceConfig:
        """Read the config from env; ConfigError names what is wrong."""
        read = EnvReader(env, "BULKHEAD_INFERENCE_")
        key = env.get("ANTHROPIC_API_KEY", "")
        provider = EnvReader(env).choice("BULKHEAD_MODEL_PROVIDER", ANTHROPIC if key else OFFLINE, (ANTHROPIC, OFFLINE))
        pinned = dict(pair.split("=", 1) for pair in read.text("PINNED_VERSIONS", _PINNED).split(",") if "=" in pair)
        allowed = tuple(m for m in read.text("ALLOWED_MODELS", ",".join(pinned) or "claude-sonnet-4-5").split(",") if m)
        upstream_timeout = read.positive("UPSTREAM_TIMEOUT", 600.0)
        return cls(
            service=ServiceConfig.from_env("inference", env),
            provider=provider,
            anthropic_api_key=key,
            anthropic_base_url=env.get("ANTHROPIC_BASE_URL") or None,
            upstream_timeout=upstream_timeout,
            max_attempts=read.int("MAX_ATTEMPTS", 3, min=1),
            max_retry_wait=read.float("MAX_RETRY_WAIT", 5.0, min=0.0),
            platform_policy=Policy(
                allowed_models=allowed,
                default_model=read.text("DEFAULT_MODEL", allowed[0] if allowed else ""),
                pinned_versions=pinned,
                max_tokens_ceiling=read.positive("MAX_TOKENS_CEILING", 8192),
            ),
            lease_tokens=read.positive("LEASE_TOKENS", 20000),
            usage_flush_seconds=read.float("USAGE_FLUSH_SECONDS", 0.2, min=0.0),
            provider_key_secret=read.text("PROVIDER_KEY_SECRET", "anthropic-api-key"),
            user_id_salt=read.optional("USER_ID_SALT"),
            allow_http_endpoints=read.flag("ALLOW_HTTP_ENDPOINTS"),
            replica_id=read.text("REPLICA_ID"),
            attempt_sweep_seconds=read.positive("ATTEMPT_SWEEP_SECONDS", upstream_timeout + 60),
            lease_idle_seconds=read.float("LEASE_IDLE_SECONDS", 0.5, min=0.0),
            workers=read.int("WORKERS", 1, min=1, max=64),
            upstream_transport=read.choice("UPSTREAM_TRANSPORT", "sdk", TRANSPORTS),
        )


TRANSPORTS = ("sdk", "sdk-aiohttp", "sdk-httpx", "direct")
"""The values of BULKHEAD_INFERENCE_UPSTREAM_TRANSPORT."""

SALT_FILE = "inference-user-id.salt"
"""The deployment's user-id salt in the data dir, when none is configured."""


def load_or_create_salt(data_dir: Path) -> str:
    """The salt kept in data_dir, made (32 random bytes, hex, mode 0600) the first time.

    Made under a temporary name and linked into place, so processes starting together (workers)
    all end up with the one that was linked first, never with a half-written file."""
    path = data_dir / SALT_FILE
    try:
        salt = path.read_text().strip()
    except FileNotFoundError:
        salt = ""
    if salt:
        return salt
    data_dir.mkdir(parents=True, exist_ok=True)
    temp = data_dir / f".{SALT_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, (secrets.token_hex(32) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temp, path)
    except FileExistsError:
        pass
    finally:
        temp.unlink()
    return path.read_text().strip()
