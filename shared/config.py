"""Configuration from environment variables, with the environment passed in so tests can inject it.

Every variable, its default and meaning:

| variable | default | meaning |
|---|---|---|
| BULKHEAD_DATA_DIR | ./.bulkhead | where embedded SQLite files, keys and the master key live |
| BULKHEAD_<SVC>_ADDR | 127.0.0.1:5005x | where others dial each service (see SERVICE_PORTS): one host:port, a comma-separated list of replicas' IP:port, or dns:///name:port; also where it listens when it is one address |
| BULKHEAD_<SVC>_LISTEN_ADDR | BULKHEAD_<SVC>_ADDR | where this replica listens, when the dial address names several (`bulkhead up --replicas`) |
| BULKHEAD_<SVC>_METRICS_PORT | 945x | Prometheus /metrics port; 0 turns it off |
| BULKHEAD_<SVC>_DATABASE_URL | sqlite+aiosqlite:///<data dir>/<svc>.db | the runtime (app role) database URL |
| BULKHEAD_<SVC>_DATABASE_OWNER_URL | the runtime URL | URL of the table owner, used only for migrations |
| BULKHEAD_DATABASE_URL / BULKHEAD_DATABASE_OWNER_URL | unset | defaults for every service's two URLs above |
| BULKHEAD_<SVC>_DATABASE_READ_URL | unset (reads on the primary) | a streaming replica of the service's Postgres, as the runtime role: list/query RPCs read there (read-your-writes by LSN, docs/CONTRACT.md) |
| BULKHEAD_DATABASE_READ_URL | unset | the replica URL for services that use BULKHEAD_DATABASE_URL (not for one with its own URL: that would read another database) |
| BULKHEAD_<SVC>_SERVICE_KEY_FILE | <data dir>/service-keys/<svc>.key | the service's platform key (identity writes it on first start) |
| BULKHEAD_OTLP_ENDPOINT | unset | OTLP/gRPC collector (Jaeger: http://jaeger:4317); unset = no export |
| BULKHEAD_LOG_LEVEL | INFO | log level |
| BULKHEAD_TLS_CA / _CERT / _KEY | unset | mTLS between services when all three are set |
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

SERVICE_PORTS: dict[str, int] = {
    "identity": 50051, "credentials": 50052, "state": 50053,
    "inference": 50054, "orchestrator": 50055, "metering": 50056,
}
"""Default gRPC port of each service; metrics listen on 9400 + the last two digits (9451...)."""

SERVICES = tuple(SERVICE_PORTS)


def _key(service: str, suffix: str) -> str:
    return f"BULKHEAD_{service.upper()}_{suffix}"


def service_addr(service: str, env: Mapping[str, str] = os.environ) -> str:
    """Where `service` listens (and where others dial it)."""
    return env.get(_key(service, "ADDR"), f"127.0.0.1:{SERVICE_PORTS[service]}")


def listen_addr(service: str, env: Mapping[str, str] = os.environ) -> str:
    """Where this process of `service` listens: its own LISTEN_ADDR, else the one dial address."""
    own = env.get(_key(service, "LISTEN_ADDR"))
    if own:
        return own
    address = service_addr(service, env)
    if "," in address or ":/" in address or address.startswith(("ipv4:", "ipv6:")):
        raise ValueError(f"{_key(service, 'ADDR')}={address!r} names several replicas or a URI: "
                         f"set {_key(service, 'LISTEN_ADDR')} to where this one listens")
    return address


def data_dir(env: Mapping[str, str] = os.environ) -> Path:
    """The directory for embedded databases and key files."""
    return Path(env.get("BULKHEAD_DATA_DIR", ".bulkhead")).expanduser().resolve()


@dataclass(frozen=True)
class ServiceConfig:
    """What every service reads from its environment."""

    name: str
    """The service's name (identity, credentials, ...)."""
    address: str
    """host:port to listen on (BULKHEAD_<SVC>_LISTEN_ADDR, else BULKHEAD_<SVC>_ADDR)."""
    metrics_port: int
    """Prometheus port; 0 turns it off."""
    database_url: str
    """Runtime database URL (the app role, which owns no table)."""
    database_owner_url: str
    """Database URL used for migrations (the table owner)."""
    data_dir: Path
    """Embedded databases and key files."""
    otlp_endpoint: str | None
    """OTLP/gRPC collector, or None for no export."""
    log_level: str
    """Log level name."""
    database_read_url: str | None = None
    """A streaming replica's runtime URL for reads, or None: every read on the primary."""
    service_key_file: Path | None = None
    """This service's platform key (BULKHEAD_<SVC>_SERVICE_KEY_FILE; default <data dir>/service-keys/<svc>.key):
    identity writes one per service on first start; the service polls revocations and suspensions with it."""
    peers: dict[str, str] = field(default_factory=dict)
    """Address of every service, by name."""
    env: Mapping[str, str] = field(default_factory=dict, repr=False)
    """The environment this was read from, for service-specific settings."""

    @classmethod
    def from_env(cls, name: str, env: Mapping[str, str] = os.environ) -> ServiceConfig:
        """Read the config of service `name` from env."""
        directory = data_dir(env)
        default_url = env.get("BULKHEAD_DATABASE_URL") or f"sqlite+aiosqlite:///{directory / (name + '.db')}"
        url = env.get(_key(name, "DATABASE_URL"), default_url)
        owner = env.get(_key(name, "DATABASE_OWNER_URL")) or env.get("BULKHEAD_DATABASE_OWNER_URL") or url
        read = env.get(_key(name, "DATABASE_READ_URL")) or None
        if read is None and url == env.get("BULKHEAD_DATABASE_URL"):
            read = env.get("BULKHEAD_DATABASE_READ_URL") or None
        return cls(
            name=name,
            address=listen_addr(name, env),
            metrics_port=int(env.get(_key(name, "METRICS_PORT"), 9400 + SERVICE_PORTS[name] % 100)),
            database_url=url,
            database_owner_url=owner,
            database_read_url=read,
            data_dir=directory,
            otlp_endpoint=env.get("BULKHEAD_OTLP_ENDPOINT") or None,
            log_level=env.get("BULKHEAD_LOG_LEVEL", "INFO"),
            service_key_file=Path(env.get(_key(name, "SERVICE_KEY_FILE"))
                                  or directory / "service-keys" / f"{name}.key"),
            peers={svc: service_addr(svc, env) for svc in SERVICES},
            env=dict(env),
        )

    def peer(self, service: str) -> str:
        """Address of another service."""
        return self.peers[service]
