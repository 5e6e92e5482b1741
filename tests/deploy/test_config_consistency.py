"""Compose and the Kubernetes manifests name the same services, ports and environment variables
as the code's configuration (shared.config and each services.<svc>.config)."""

from __future__ import annotations

import importlib
import inspect
import re
import urllib.parse

import pytest
import yaml

from bulkhead_cli import certs
from shared.config import SERVICE_PORTS, SERVICES, ServiceConfig
from shared.db.rls import app_role_from_env
from shared.tls import ENV_VARS as TLS_ENV
from tests.deploy.k8s_helpers import (
    DEPLOY,
    K8S,
    OVERLAYS,
    ROOT,
    RecordingEnv,
    container_env,
    find,
    namespace_of,
    one,
    render,
)

BACKING = {"postgres", "openbao", "jaeger"}
LIBRARY_ENV = {"REQUESTS_CA_BUNDLE"}
"""Read by a library rather than our config: requests (under hvac) trusts OpenBao's CA through it."""


def _metrics_port(svc: str) -> int:
    return 9400 + SERVICE_PORTS[svc] % 100


def read_by_code(svc: str, env: dict[str, str]) -> set[str]:
    """The variable names service `svc` looks up when it reads its configuration from env."""
    recorder = RecordingEnv(env)
    ServiceConfig.from_env(svc, recorder)
    app_role_from_env(recorder)  # read by migrations that grant to the runtime role by name
    try:
        module = importlib.import_module(f"services.{svc}.config")
    except ModuleNotFoundError:
        return recorder.read
    for _, cls in inspect.getmembers(module, inspect.isclass):
        if cls.__module__ == module.__name__ and callable(getattr(cls, "from_env", None)):
            cls.from_env(recorder)  # also proves the deployed settings are accepted
    return recorder.read


# -- compose --------------------------------------------------------------------------------

_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def _interpolate(value: str) -> str:
    """Compose's ${VAR:-default} with an empty shell environment."""
    return _VAR.sub(lambda m: m.group(2) or "", value)


@pytest.fixture(scope="module")
def compose() -> dict:
    """deploy/compose.yaml, parsed (YAML merge keys resolved)."""
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def _compose_env(compose: dict, svc: str) -> dict[str, str]:
    return {k: _interpolate(str(v)) for k, v in compose["services"][svc]["environment"].items()}


def test_the_six_services_are_named_alike_everywhere(compose: dict) -> None:
    """shared.config, compose, the entrypoint, the cert tool and the k8s base list the same six services."""
    assert set(compose["services"]) - BACKING == set(SERVICES)
    assert set(certs.SERVICES) == set(SERVICES)
    entrypoint = (DEPLOY / "entrypoint.sh").read_text()
    assert set(re.search(r"^\s*([a-z|]+)\) ;;", entrypoint, re.MULTILINE).group(1).split("|")) == set(SERVICES)
    base = {p.stem for p in (K8S / "base").glob("*.yaml")} & set(SERVICE_PORTS)
    assert base == set(SERVICES)


def test_every_service_module_is_runnable() -> None:
    """`python -m services.<svc>` (the image's entrypoint) exists for each service."""
    for svc in SERVICES:
        assert importlib.util.find_spec(f"services.{svc}.__main__") is not None, svc


@pytest.mark.parametrize("svc", SERVICES)
def test_compose_service_matches_code_config(compose: dict, svc: str) -> None:
    """In compose, a service listens on its port on all interfaces and finds its peers by service name."""
    spec = compose["services"][svc]
    env = _compose_env(compose, svc)
    cfg = ServiceConfig.from_env(svc, env)
    assert cfg.address == f"0.0.0.0:{SERVICE_PORTS[svc]}"
    assert cfg.metrics_port == _metrics_port(svc)
    for peer, port in SERVICE_PORTS.items():
        if peer != svc:
            assert cfg.peer(peer) == f"{peer}:{port}"
    assert spec["command"] == [svc]
    assert spec["ports"] == [f"127.0.0.1:{SERVICE_PORTS[svc]}:{SERVICE_PORTS[svc]}"]
    assert spec["healthcheck"]["test"] == ["CMD", "bulkhead-healthcheck", svc]
    assert cfg.otlp_endpoint == "http://jaeger:4317"
    _check_database_urls(cfg, svc, host="postgres")


@pytest.mark.parametrize("svc", SERVICES)
def test_compose_sets_only_variables_the_code_reads(compose: dict, svc: str) -> None:
    """Every variable compose gives a service is one that service's config actually looks up (no typos)."""
    env = _compose_env(compose, svc)
    unread = set(env) - read_by_code(svc, env)
    assert not unread, f"{svc}: compose sets variables the code never reads: {sorted(unread)}"


def test_compose_starts_the_backing_stores_and_identity_first(compose: dict) -> None:
    """Postgres before every service; identity (signing keys) before the rest; OpenBao before credentials."""
    for svc in SERVICES:
        after = compose["services"][svc]["depends_on"]
        assert after["postgres"]["condition"] == "service_healthy"
        if svc != "identity":
            assert after["identity"]["condition"] == "service_healthy", svc
        assert ("openbao" in after) == (svc == "credentials"), svc


def test_compose_databases_match_the_init_script(compose: dict) -> None:
    """The roles and databases in the services' URLs are the ones init-databases.sh creates."""
    script = (DEPLOY / "postgres" / "init-databases.sh").read_text()
    listed = re.search(r"for svc in ([a-z ]+); do", script).group(1).split()
    assert set(listed) == set(SERVICES)
    pg = compose["services"]["postgres"]["environment"]
    for svc in SERVICES:
        cfg = ServiceConfig.from_env(svc, _compose_env(compose, svc))
        app = urllib.parse.urlsplit(cfg.database_url)
        owner = urllib.parse.urlsplit(cfg.database_owner_url)
        assert app.password == _interpolate(pg["BULKHEAD_PG_APP_PASSWORD"])
        assert owner.password == _interpolate(pg["BULKHEAD_PG_OWNER_PASSWORD"])


def _check_database_urls(cfg: ServiceConfig, svc: str, *, host: str | None) -> None:
    if host is None:  # Secrets made outside the repo (prod): the URLs must come from the service's own Secret
        assert cfg.database_url == f"<secret bulkhead-{svc}-database/url>"
        assert cfg.database_owner_url == f"<secret bulkhead-{svc}-database/owner-url>"
        return
    app = urllib.parse.urlsplit(cfg.database_url)
    owner = urllib.parse.urlsplit(cfg.database_owner_url)
    assert app.scheme == owner.scheme == "postgresql+asyncpg"
    assert app.hostname == owner.hostname == host
    assert app.path == owner.path == f"/bulkhead_{svc}"
    # The runtime role is not the owner: row level security applies to it.
    assert (app.username, owner.username) == (f"bulkhead_{svc}_app", f"bulkhead_{svc}")
    assert app_role_from_env(cfg.env) == app.username  # what name-granting migrations grant to


# -- Kubernetes -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def overlays() -> dict[str, list[dict]]:
    """The rendered overlays."""
    return {name: render(K8S / "overlays" / name) for name in OVERLAYS}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifests_match_code_config(overlays, overlay: str) -> None:
    """Each Deployment's environment makes the code listen on its port and dial Services that exist."""
    objs = overlays[overlay]
    central = overlays["prod"]
    for dep in find(objs, "Deployment"):
        svc = dep["spec"]["template"]["spec"]["containers"][0]["name"]
        if svc not in SERVICE_PORTS:
            continue
        (container,) = dep["spec"]["template"]["spec"]["containers"]
        env, _, _ = container_env(objs, container)
        cfg = ServiceConfig.from_env(svc, env)
        assert cfg.address == f"0.0.0.0:{SERVICE_PORTS[svc]}"
        assert cfg.metrics_port == _metrics_port(svc)
        assert dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(cfg.metrics_port)
        for peer, port in SERVICE_PORTS.items():
            if peer == svc:
                continue
            host, _, dialled = cfg.peer(peer).rpartition(":")
            assert int(dialled) == port, (svc, peer)
            name, *rest = host.split(".")
            # Same-namespace short names, or <svc>.<namespace>.svc.cluster.local for the shared identity.
            if rest:
                assert rest == [namespace_of(central), "svc", "cluster", "local"], host
            where = central if rest else objs
            target = one(where, "Service", name)
            assert {p["name"]: p["port"] for p in target["spec"]["ports"]}["grpc"] == port
        otlp = urllib.parse.urlsplit(cfg.otlp_endpoint or "")
        jaeger_objs = objs if "." not in otlp.hostname else central
        jaeger = one(jaeger_objs, "Service", otlp.hostname.split(".")[0])
        assert otlp.port in {p["port"] for p in jaeger["spec"]["ports"]}
        _check_database_urls(cfg, svc, host="postgres" if overlay == "dev" else None)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifests_set_only_variables_the_code_reads(overlays, overlay: str) -> None:
    """Each container variable is read by its service; each mesh ConfigMap variable by some service."""
    objs = overlays[overlay]
    read_anywhere: set[str] = set()
    from_maps_all: set[str] = set()
    for dep in find(objs, "Deployment"):
        (container,) = dep["spec"]["template"]["spec"]["containers"]
        svc = container["name"]
        if svc not in SERVICE_PORTS:
            continue
        env, from_maps, own = container_env(objs, container)
        read = read_by_code(svc, env) | set(TLS_ENV) | LIBRARY_ENV  # TLS has its own test below
        assert not own - read, f"{overlay}/{svc}: variables the code never reads: {sorted(own - read)}"
        read_anywhere |= read
        from_maps_all |= from_maps
    assert not from_maps_all - read_anywhere, sorted(from_maps_all - read_anywhere)


TLS_PENDING: set[str] = set()
"""Services whose code does not yet hand BULKHEAD_TLS_* to serve() and to every make_channel().
A ratchet: when a service starts using TLS its strict xfail below passes, which fails the run:
remove it from this set then."""


def _calls(source: str, name: str) -> list[str]:
    """The argument text of every call `name(...)` in source (balanced parentheses)."""
    found = []
    for match in re.finditer(rf"\b{name}\(", source):
        depth, i = 1, match.end()
        while depth and i < len(source):
            depth += {"(": 1, ")": -1}.get(source[i], 0)
            i += 1
        found.append(source[match.end() : i - 1])
    return found


def tls_gaps(svc: str) -> list[str]:
    """Where a service opts out of BULKHEAD_TLS_* (serve() and make_channel() read them by default)."""
    gaps = []
    for path in sorted((ROOT / "services" / svc).glob("*.py")):
        source = path.read_text()
        gaps += [f"{path.name}: serve(tls=None)" for args in _calls(source, "serve") if "tls=None" in args]
        gaps += [
            f"{path.name}: make_channel(tls=None)" for args in _calls(source, "make_channel") if "tls=None" in args
        ]
    return gaps


@pytest.mark.parametrize(
    "svc",
    [
        pytest.param(s, marks=pytest.mark.xfail(strict=True, reason="service does not wire TLS yet (TLS_PENDING)"))
        if s in TLS_PENDING
        else s
        for s in SERVICES
    ],
)
def test_services_given_certificates_serve_and_dial_with_them(overlays, svc: str) -> None:
    """Where prod turns mTLS on, the service serves TLS and dials its peers with its certificate."""
    container = one(overlays["prod"], "Deployment", svc)["spec"]["template"]["spec"]["containers"][0]
    assert {e["name"] for e in container["env"]} >= set(TLS_ENV)
    assert not tls_gaps(svc), tls_gaps(svc)


@pytest.mark.parametrize("overlay", ["prod", "silo-tenant"])
def test_credentials_trusts_the_openbao_cluster_ca(overlays, overlay: str) -> None:
    """With the Raft cluster (TLS only), credentials dials https and trusts the CA file it mounts."""
    objs = overlays[overlay]
    spec = one(objs, "Deployment", "credentials")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    env, _, _ = container_env(objs, container)
    assert env["BULKHEAD_SECRETS_BACKEND"] == "vault"
    vault = urllib.parse.urlsplit(env["BULKHEAD_VAULT_ADDR"])
    assert vault.scheme == "https" and vault.port == 8200
    host = vault.hostname.split(".")
    assert host[0] == "openbao" and (
        len(host) == 1 or host[1:] == [namespace_of(overlays["prod"]), "svc", "cluster", "local"]
    )
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert env["REQUESTS_CA_BUNDLE"] == f"{mounts['openbao-ca']}/ca.crt"
    assert volumes["openbao-ca"]["secret"]["secretName"] == "openbao-tls"


def test_dockerfile_exposes_every_port() -> None:
    """The image exposes each service's gRPC and metrics port."""
    text = (DEPLOY / "Dockerfile").read_text()
    exposed = {int(p) for line in text.splitlines() if line.startswith("EXPOSE") for p in line.split()[1:]}
    assert exposed == set(SERVICE_PORTS.values()) | {_metrics_port(s) for s in SERVICES}
