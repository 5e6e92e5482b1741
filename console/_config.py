"""The console's settings, read from an environment that callers pass in (tests inject theirs)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from shared.config import SERVICES, service_addr

DEFAULT_ADDR = "127.0.0.1:8080"
"""Where the console listens unless BULKHEAD_CONSOLE_ADDR says otherwise."""


@dataclass(frozen=True)
class ConsoleConfig:
    """What the console reads from its environment."""

    address: str = DEFAULT_ADDR
    """host:port the HTTP server listens on (BULKHEAD_CONSOLE_ADDR)."""
    peers: dict[str, str] = field(default_factory=dict)
    """gRPC address of every mesh service, by name (BULKHEAD_<SVC>_ADDR)."""
    tls_cert: str = ""
    """PEM certificate for HTTPS (BULKHEAD_CONSOLE_TLS_CERT); empty serves plain HTTP on loopback."""
    tls_key: str = ""
    """PEM key for HTTPS (BULKHEAD_CONSOLE_TLS_KEY)."""
    token_ttl: int = 900
    """Lifetime asked of IssueToken for a session's token, in seconds (BULKHEAD_CONSOLE_TOKEN_TTL)."""
    session_idle: int = 8 * 3600
    """A session unused this long is forgotten and its token revoked (BULKHEAD_CONSOLE_SESSION_IDLE)."""
    jaeger_url: str = ""
    """Jaeger UI base URL (BULKHEAD_CONSOLE_JAEGER_URL): a run's trace id links to <url>/trace/<id>;
    empty shows the id as text."""
    max_sessions: int = 10_000
    """Sessions kept in memory at most; the least recently used goes first."""
    env: Mapping[str, str] = field(default_factory=dict, repr=False)
    """The environment this was read from (for the mesh channels' TLS settings)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> ConsoleConfig:
        """Read the console's config from env."""
        return cls(
            address=env.get("BULKHEAD_CONSOLE_ADDR") or DEFAULT_ADDR,
            peers={svc: service_addr(svc, env) for svc in SERVICES},
            tls_cert=env.get("BULKHEAD_CONSOLE_TLS_CERT", ""),
            tls_key=env.get("BULKHEAD_CONSOLE_TLS_KEY", ""),
            token_ttl=int(env.get("BULKHEAD_CONSOLE_TOKEN_TTL") or 900),
            session_idle=int(env.get("BULKHEAD_CONSOLE_SESSION_IDLE") or 8 * 3600),
            jaeger_url=(env.get("BULKHEAD_CONSOLE_JAEGER_URL") or "").rstrip("/"),
            env=dict(env),
        )

    @property
    def host(self) -> str:
        return self.address.rpartition(":")[0] or "127.0.0.1"

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])
