"""Configuration from environment variables, with the environment passed in so tests can inject it.

Every variable, its default and meaning:

| variable | default | meaning |
|---|---|---|
| BULKHEAD_DATA_DIR | ./.bulkhead | where embedded SQLite files, keys and the master key live |
| BULKHEAD_<SVC>_ADDR | 127.0.0.1:5005x | where others dial each service (see SERVICE_PORTS): one host:port, a comma-separated list of replicas' IP:port, or dns:///name:port; also where it listens when it is one address |
| BULKHEAD_<SVC>_LISTEN_ADDR | BULKHEAD_<SVC>_ADDR | where this replica listens, when the dial address names several (`bulkhead up --replicas`) |
| BULKHEAD_<SVC>_METRICS_PORT | 945x | Prometheus /metrics port; 0 turns it off (with several workers their parent serves the sum of theirs) |
| BULKHEAD_<SVC>_DATABASE_URL | sqlite+aiosqlite:///<data dir>/<svc>.db | the runtime (app role) database URL |
| BULKHEAD_<SVC>_DATABASE_OWNER_URL | the runtime URL | URL of the table owner, used only for migrations |
| BULKHEAD_DATABASE_URL / BULKHEAD_DATABASE_OWNER_URL | unset | defaults for every service's two URLs above |
| BULKHEAD_<SVC>_DATABASE_READ_URL | unset (reads on the primary) | a streaming replica of the service's Postgres, as the runtime role: list/query RPCs read there (read-your-writes by LSN, docs/CONTRACT.md) |
| BULKHEAD_DATABASE_READ_URL | unset | the replica URL for services that use BULKHEAD_DATABASE_URL (not for one with its own URL: that would read another database) |
| BULKHEAD_REGIONS | the default region alone | comma-separated data-residency regions (`us,eu`); identity refuses a tenant in any other |
| BULKHEAD_DEFAULT_REGION | the first of BULKHEAD_REGIONS, else `local` | the region of a tenant created without one; its databases are the URLs above |
| BULKHEAD_<SVC>_DATABASE_URL_<REGION> / _DATABASE_OWNER_URL_<REGION> | BULKHEAD_DATABASE_URL_<REGION> / _OWNER_URL_<REGION>; embedded: <data dir>/regions/<region>/<svc>.db | the database of each other region: its tenants' rows (every tier) live there and nowhere else |
| BULKHEAD_<SVC>_SERVICE_KEY_FILE | <data dir>/service-keys/<svc>.key | the service's platform key (identity writes it on first start) |
| BULKHEAD_OTLP_ENDPOINT | unset | OTLP/gRPC collector (Jaeger: http://jaeger:4317); unset = no export |
| BULKHEAD_LOG_LEVEL | INFO | log level |
| BULKHEAD_TLS_CA / _CERT / _KEY | unset | mTLS between services when all three are set |

Every bad value raises ConfigError (a ValueError) naming the variable and the values it takes; each
service's config reads its own variables through EnvReader, so they all fail the same way.
"""

from __future__ import annotations

import builtins
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from shared.tls import TlsConfig

SERVICE_PORTS: dict[str, int] = {
    "identity": 50051,
    "credentials": 50052,
    "state": 50053,
    "inference": 50054,
    "orchestrator": 50055,
    "metering": 50056,
}
"""Default gRPC port of each service; metrics listen on 9400 + the last two digits (9451...)."""

SERVICES = tuple(SERVICE_PORTS)


class ConfigError(ValueError):
    """The environment describes a configuration the service refuses to run with; the message names the variable.

    A ValueError, so callers catching ValueError (the CLI) keep working; shared.tls.TlsConfigError is one."""


_N = TypeVar("_N", builtins.int, builtins.float)


class EnvReader:
    """Typed reads of an injected environment: each bad value is a ConfigError naming the variable and what it takes.

    Unset and empty variables give the default."""

    def __init__(self, env: Mapping[str, str], prefix: str = "") -> None:
        self.env = env
        """The environment read."""
        self.prefix = prefix
        """Prepended to every name (e.g. "BULKHEAD_ORCHESTRATOR_")."""

    def _raw(self, name: str) -> str | None:
        value = self.env.get(self.prefix + name, "").strip()
        return value or None

    def text(self, name: str, default: str = "") -> str:
        """The value as it is, else default."""
        return self._raw(name) or default

    def optional(self, name: str) -> str | None:
        """The value, or None when unset."""
        return self._raw(name)

    def int(
        self, name: str, default: builtins.int, *, min: builtins.int | None = None, max: builtins.int | None = None
    ) -> builtins.int:
        """An integer within [min, max]."""
        return self._number(name, default, builtins.int, "an integer", min, max)

    def float(
        self,
        name: str,
        default: builtins.float,
        *,
        min: builtins.float | None = None,
        max: builtins.float | None = None,
    ) -> builtins.float:
        """A number within [min, max]."""
        return self._number(name, default, builtins.float, "a number", min, max)

    def positive(self, name: str, default: _N) -> _N:
        """A number above zero (an integer when default is one)."""
        kind = type(default)
        value = self._number(name, default, kind, "an integer" if kind is builtins.int else "a number", None, None)
        if value <= 0:
            raise ConfigError(f"{self.prefix + name} must be positive, not {value}")
        return value

    def choice(self, name: str, default: str, choices: tuple[str, ...], *, lower: bool = False) -> str:
        """One of choices (compared lower-cased when lower)."""
        raw = self._raw(name)
        value = default if raw is None else (raw.lower() if lower else raw)
        if value not in choices:
            allowed = ", ".join(choices[:-1]) + f" or {choices[-1]}" if len(choices) > 1 else choices[0]
            raise ConfigError(f"{self.prefix + name} must be {allowed}, not {value!r}")
        return value

    def flag(self, name: str, default: bool = False) -> bool:
        """1/true/yes/on or 0/false/no/off."""
        raw = self._raw(name)
        if raw is None:
            return default
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{self.prefix + name} must be 1 or 0 (true/false), not {raw!r}")

    def path(self, name: str, default: Path) -> Path:
        """A file or directory path (~ expanded), else default."""
        raw = self._raw(name)
        return default if raw is None else Path(raw).expanduser()

    def _number(self, name: str, default: _N, kind: type[_N], what: str, low: _N | None, high: _N | None) -> _N:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = kind(raw)
        except ValueError:
            raise ConfigError(f"{self.prefix + name} must be {what}, not {raw!r}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            if low is not None and high is not None:
                bounds = f"{low}..{high}"
            else:
                bounds = f"at least {low}" if low is not None else f"at most {high}"
            raise ConfigError(f"{self.prefix + name} must be {bounds}, not {value}")
        return value


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
        raise ConfigError(
            f"{_key(service, 'ADDR')}={address!r} names several replicas or a URI: "
            f"set {_key(service, 'LISTEN_ADDR')} to where this one listens"
        )
    return address


DEFAULT_REGION = "local"
"""The region of a single-region deployment (and of tenants created before regions were configured)."""

_REGION_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}$")


def regions(env: Mapping[str, str] = os.environ) -> tuple[str, ...]:
    """The configured data-residency regions (BULKHEAD_REGIONS), the default one first.

    Unset: the default region alone, so a single-region deployment configures nothing."""
    default = default_region(env)
    listed = _region_list(env)
    if listed and default not in listed:
        raise ConfigError(f"BULKHEAD_DEFAULT_REGION={default!r} is not one of BULKHEAD_REGIONS ({', '.join(listed)})")
    return (default, *(r for r in listed if r != default))


def default_region(env: Mapping[str, str] = os.environ) -> str:
    """The region of tenants created without one (BULKHEAD_DEFAULT_REGION, else the first listed, else `local`)."""
    named = env.get("BULKHEAD_DEFAULT_REGION", "").strip()
    if named:
        return _checked_region(named, "BULKHEAD_DEFAULT_REGION")
    listed = _region_list(env)
    return listed[0] if listed else DEFAULT_REGION


def _region_list(env: Mapping[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    for part in env.get("BULKHEAD_REGIONS", "").split(","):
        name = part.strip()
        if name and name not in out:
            out.append(_checked_region(name, "BULKHEAD_REGIONS"))
    return tuple(out)


def _checked_region(name: str, variable: str) -> str:
    if not _REGION_RE.match(name):
        raise ConfigError(f"{variable}: region {name!r} must be 1-31 of [a-z0-9-], starting with a letter")
    return name


def region_suffix(region: str) -> str:
    """A region's name as an environment variable suffix (`eu-west` -> `EU_WEST`)."""
    return region.upper().replace("-", "_")


@dataclass(frozen=True)
class RegionDatabase:
    """One region's database for one service."""

    url: str
    """Runtime (app role) URL."""
    owner_url: str
    """Table owner's URL (migrations; creates bridge schemas and silo databases in that region)."""


def data_dir(env: Mapping[str, str] = os.environ) -> Path:
    """The directory for embedded databases and key files."""
    return Path(env.get("BULKHEAD_DATA_DIR", ".bulkhead")).expanduser().resolve()


DATABASE_POOLS = {"orchestrator": 16, "state": 16}
"""Connections kept open per database where SQLAlchemy's 5 is too few: every run start, admission, step and
end is a transaction in both, and a busy replica kept opening and closing connections (the orchestrator 0.66
new Postgres connections per run at 100 concurrent runs, state 1.3)."""


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
    default_region: str = DEFAULT_REGION
    """The region whose database is database_url (BULKHEAD_DEFAULT_REGION): also where platform tables live."""
    regions: tuple[str, ...] = (DEFAULT_REGION,)
    """Every configured region, default first (BULKHEAD_REGIONS)."""
    database_pool: int = 5
    """Database connections a replica keeps open per database (SQLAlchemy's pool_size; BULKHEAD_<SVC>_DATABASE_POOL,
    default DATABASE_POOLS[service]); as many again, at least 10, open for bursts and close after."""
    tls: TlsConfig | None = None
    """mTLS between services (BULKHEAD_TLS_CA/_CERT/_KEY of this environment), or None for plaintext: the
    service hands it to serve() and to every channel it opens, never reading os.environ for it."""

    @classmethod
    def from_env(cls, name: str, env: Mapping[str, str] = os.environ) -> ServiceConfig:
        """Read the config of service `name` from env (ConfigError names a bad variable)."""
        from shared.tls import TlsConfig  # shared.tls's error is a ConfigError: imported here, not at the top

        directory = data_dir(env)
        read = EnvReader(env)
        default_url = env.get("BULKHEAD_DATABASE_URL") or f"sqlite+aiosqlite:///{directory / (name + '.db')}"
        url = env.get(_key(name, "DATABASE_URL"), default_url)
        owner = env.get(_key(name, "DATABASE_OWNER_URL")) or env.get("BULKHEAD_DATABASE_OWNER_URL") or url
        replica = env.get(_key(name, "DATABASE_READ_URL")) or None
        if replica is None and url == env.get("BULKHEAD_DATABASE_URL"):
            replica = env.get("BULKHEAD_DATABASE_READ_URL") or None
        return cls(
            name=name,
            address=listen_addr(name, env),
            metrics_port=read.int(_key(name, "METRICS_PORT"), 9400 + SERVICE_PORTS[name] % 100, min=0, max=65535),
            database_url=url,
            database_owner_url=owner,
            database_read_url=replica,
            data_dir=directory,
            otlp_endpoint=env.get("BULKHEAD_OTLP_ENDPOINT") or None,
            log_level=env.get("BULKHEAD_LOG_LEVEL", "INFO"),
            service_key_file=read.path(_key(name, "SERVICE_KEY_FILE"), directory / "service-keys" / f"{name}.key"),
            peers={svc: service_addr(svc, env) for svc in SERVICES},
            env=dict(env),
            default_region=default_region(env),
            regions=regions(env),
            database_pool=read.positive(_key(name, "DATABASE_POOL"), DATABASE_POOLS.get(name, 5)),
            tls=TlsConfig.from_env(env),
        )

    @property
    def database_overflow(self) -> int:
        """Connections opened beyond the pool for bursts (closed after use): as many as the pool, at least 10."""
        return max(self.database_pool, 10)

    def region_databases(self) -> dict[str, RegionDatabase]:
        """This service's database in every region, default first (its URLs are database_url/_owner_url).

        Another region's URL is BULKHEAD_<SVC>_DATABASE_URL_<REGION>, else BULKHEAD_DATABASE_URL_<REGION>;
        on embedded defaults (no URL configured at all) an SQLite file under <data dir>/regions/<region>/.
        A region with neither is a configuration error, raised here at start, never at a tenant's first call.
        """
        env = self.env
        out = {self.default_region: RegionDatabase(self.database_url, self.database_owner_url)}
        embedded = not (env.get(_key(self.name, "DATABASE_URL")) or env.get("BULKHEAD_DATABASE_URL"))
        for region in self.regions[1:]:
            suffix = region_suffix(region)
            url = env.get(_key(self.name, f"DATABASE_URL_{suffix}")) or env.get(f"BULKHEAD_DATABASE_URL_{suffix}")
            if not url and embedded:
                url = f"sqlite+aiosqlite:///{self.data_dir / 'regions' / region / (self.name + '.db')}"
            if not url:
                raise ConfigError(
                    f"region {region!r} has no {self.name} database: set "
                    f"{_key(self.name, 'DATABASE_URL_' + suffix)} or BULKHEAD_DATABASE_URL_{suffix}"
                )
            owner = (
                env.get(_key(self.name, f"DATABASE_OWNER_URL_{suffix}"))
                or env.get(f"BULKHEAD_DATABASE_OWNER_URL_{suffix}")
                or url
            )
            out[region] = RegionDatabase(url, owner)
        return out

    def peer(self, service: str) -> str:
        """Address of another service."""
        return self.peers[service]
