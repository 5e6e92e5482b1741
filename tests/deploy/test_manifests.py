"""Kubernetes manifests: schema-valid offline, complete per service, and network policies that admit
exactly the callers each service needs."""

from __future__ import annotations

import copy
import pathlib

import kubernetes_validate
import pytest

from services.inference.config import SALT_FILE
from shared.config import SERVICE_PORTS, SERVICES
from tests.deploy.k8s_helpers import (
    DEPLOY,
    K8S,
    KUBERNETES_VERSION,
    OVERLAYS,
    Obj,
    Pod,
    find,
    ingress_allowed,
    load_yaml_files,
    namespace_of,
    one,
    pod_of,
    render,
)

CALLERS = {
    "identity": {"credentials", "state", "inference", "orchestrator", "metering"},
    "credentials": {"state", "inference", "orchestrator"},
    "state": {"orchestrator"},
    "inference": {"orchestrator"},
    "metering": {"inference"},
    "orchestrator": set(),
}
"""Who may open a connection to whom inside one namespace (the issue's call graph)."""
EDGE = {"identity", "credentials", "inference", "orchestrator", "metering"}
"""Services that tenants' clients call through the gateway namespace."""


def _validate(obj: Obj) -> None:
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Obj]]:
    """Every overlay (and the base and the backing stores) rendered once for this module."""
    dirs = {name: K8S / "overlays" / name for name in OVERLAYS}
    dirs |= {
        "base": K8S / "base",
        "postgres": DEPLOY / "postgres",
        "openbao-dev": DEPLOY / "openbao" / "dev",
        "openbao-raft": DEPLOY / "openbao" / "raft",
    }
    return {name: render(path) for name, path in dirs.items()}


def _services_in(overlay: str) -> tuple[str, ...]:
    # A silo namespace uses the shared identity of the main namespace.
    return tuple(s for s in SERVICES if not (overlay == "silo-tenant" and s == "identity"))


def test_every_plain_manifest_file_is_schema_valid() -> None:
    """Each Kubernetes object written in deploy/ validates on its own (no renderer needed)."""
    import yaml

    patch_files = {
        (k.parent / p["path"]).resolve()
        for k in DEPLOY.rglob("kustomization.yaml")
        for p in yaml.safe_load(k.read_text()).get("patches", ())
        if "path" in p
    }
    checked = 0
    for path, doc in load_yaml_files(DEPLOY):
        if path.name in ("compose.yaml", "kustomization.yaml") or path.resolve() in patch_files:
            continue
        try:
            _validate(doc)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.relative_to(DEPLOY)}: {doc['kind']}/{doc['metadata']['name']}: {exc.message}")
        checked += 1
    assert checked >= 25


def test_validator_rejects_a_misspelt_field() -> None:
    """The schema check is real: a typo in a Deployment is an error, not silently ignored."""
    doc = next(d for p, d in load_yaml_files(K8S / "base") if d.get("kind") == "Deployment")
    broken = copy.deepcopy(doc)
    broken["spec"]["replica"] = broken["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(broken)


@pytest.mark.parametrize("name", ["base", "postgres", "openbao-dev", "openbao-raft", *OVERLAYS])
def test_rendered_objects_are_schema_valid(rendered: dict[str, list[Obj]], name: str) -> None:
    """Everything each kustomization renders validates against the Kubernetes schemas."""
    for obj in rendered[name]:
        try:
            _validate(obj)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {obj['kind']}/{obj['metadata']['name']}: {exc.message}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_service_has_deployment_service_probes_resources_pdb(rendered, overlay: str) -> None:
    """Per service: a Deployment with probes and resources, a Service on its port and a PDB that covers it."""
    objs = rendered[overlay]
    for svc in _services_in(overlay):
        port, metrics = SERVICE_PORTS[svc], 9400 + SERVICE_PORTS[svc] % 100
        dep = one(objs, "Deployment", svc)
        pod_labels = dep["spec"]["template"]["metadata"]["labels"]
        (container,) = dep["spec"]["template"]["spec"]["containers"]
        assert container["args"] == [svc]
        assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"grpc": port, "metrics": metrics}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            handler = container[probe]
            assert handler.get("grpc", {}).get("port") == port or handler.get("exec", {}).get("command") == [
                "bulkhead-healthcheck",
                svc,
            ], (svc, probe)
        assert {"cpu", "memory"} <= set(container["resources"]["requests"])
        assert "memory" in container["resources"]["limits"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        service = one(objs, "Service", svc)
        assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"grpc": port, "metrics": metrics}
        assert all(pod_labels.get(k) == v for k, v in service["spec"]["selector"].items())
        pdb = one(objs, "PodDisruptionBudget", svc)
        assert all(pod_labels.get(k) == v for k, v in pdb["spec"]["selector"]["matchLabels"].items())
    if overlay == "silo-tenant":
        assert not find(objs, "Deployment", "identity") and not find(objs, "Deployment", "jaeger")


def test_prod_runs_three_replicas_and_dev_one(rendered) -> None:
    """prod scales every service to three replicas spread over nodes; dev runs one of each."""
    for svc in SERVICES:
        prod = one(rendered["prod"], "Deployment", svc)["spec"]
        assert prod["replicas"] == 3
        assert prod["template"]["spec"]["topologySpreadConstraints"][0]["whenUnsatisfiable"] == "DoNotSchedule"
        assert one(rendered["dev"], "Deployment", svc)["spec"]["replicas"] == 1


def _ns_pod(namespace: str, ns_labels: dict[str, str], **labels: str) -> Pod:
    return Pod(namespace, labels, ns_labels)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_admit_exactly_the_call_graph(rendered, overlay: str) -> None:
    """Inside a namespace, service A reaches service B's gRPC port iff A is one of B's callers."""
    objs = rendered[overlay]
    policies = find(objs, "NetworkPolicy")
    services = _services_in(overlay)
    for dst in services:
        dst_pod = pod_of(objs, "Deployment", dst)
        for src in services:
            allowed = ingress_allowed(policies, dst_pod, pod_of(objs, "Deployment", src), SERVICE_PORTS[dst])
            assert allowed == (src in CALLERS[dst]), f"{overlay}: {src} -> {dst} allowed={allowed}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_outsiders_reach_only_the_edge_services(rendered, overlay: str) -> None:
    """A gateway pod reaches the tenant-facing services only; a pod of any other namespace reaches none."""
    objs = rendered[overlay]
    policies = find(objs, "NetworkPolicy")
    gateway = _ns_pod("ingress", {"bulkhead.dev/gateway": "true"}, app="gateway")
    stranger = _ns_pod(
        "other-team", {"kubernetes.io/metadata.name": "other-team"}, **{"app.kubernetes.io/name": "state"}
    )
    for svc in _services_in(overlay):
        dst = pod_of(objs, "Deployment", svc)
        assert ingress_allowed(policies, dst, gateway, SERVICE_PORTS[svc]) == (svc in EDGE), svc
        assert not ingress_allowed(policies, dst, stranger, SERVICE_PORTS[svc]), svc
        # Prometheus (monitoring namespace) may scrape metrics, but not call the API.
        prom = _ns_pod("monitoring", {"bulkhead.dev/monitoring": "true"}, app="prometheus")
        assert ingress_allowed(policies, dst, prom, 9400 + SERVICE_PORTS[svc] % 100)
        assert not ingress_allowed(policies, dst, prom, SERVICE_PORTS[svc])


def test_backing_stores_admit_only_their_clients(rendered) -> None:
    """Postgres admits the six services; OpenBao only credentials; Jaeger's OTLP port every service."""
    objs = rendered["dev"]
    policies = find(objs, "NetworkPolicy")
    postgres, openbao = pod_of(objs, "StatefulSet", "postgres"), pod_of(objs, "Deployment", "openbao")
    jaeger = pod_of(objs, "Deployment", "jaeger")
    stranger = _ns_pod("bulkhead", {}, app="debug-shell")
    for svc in SERVICES:
        src = pod_of(objs, "Deployment", svc)
        assert ingress_allowed(policies, postgres, src, 5432)
        assert ingress_allowed(policies, openbao, src, 8200) == (svc == "credentials")
        assert ingress_allowed(policies, jaeger, src, 4317)
    for store, port in ((postgres, 5432), (openbao, 8200), (jaeger, 4317)):
        assert not ingress_allowed(policies, store, stranger, port)


def test_silo_namespace_reaches_shared_identity_but_nothing_else_central(rendered) -> None:
    """A silo tenant's services fetch keys from the main namespace's identity, and touch nothing else there."""
    central, silo = rendered["prod"], rendered["silo-tenant"]
    policies = find(central, "NetworkPolicy")
    for svc in _services_in("silo-tenant"):
        src = pod_of(silo, "Deployment", svc)
        assert src.namespace != namespace_of(central)
        assert ingress_allowed(policies, pod_of(central, "Deployment", "identity"), src, SERVICE_PORTS["identity"])
        for dst in ("credentials", "state", "inference", "orchestrator", "metering"):
            assert not ingress_allowed(policies, pod_of(central, "Deployment", dst), src, SERVICE_PORTS[dst]), (
                svc,
                dst,
            )
    # ... except credentials, which reaches the shared OpenBao cluster (its tenant has a namespace there).
    openbao = pod_of(
        rendered["openbao-raft"] + [one(central, "Namespace", namespace_of(central))], "StatefulSet", "openbao"
    )
    for svc in _services_in("silo-tenant"):
        src = pod_of(silo, "Deployment", svc)
        assert ingress_allowed(policies, openbao, src, 8200) == (svc == "credentials"), svc
    mesh = one(silo, "ConfigMap", "bulkhead-mesh")["data"]
    assert mesh["BULKHEAD_IDENTITY_ADDR"] == f"identity.{namespace_of(central)}.svc.cluster.local:50051"
    ns = one(silo, "Namespace", namespace_of(silo))["metadata"]["labels"]
    assert ns["bulkhead.dev/tier"] == "silo" and ns["bulkhead.dev/tenant"].startswith("t_")


@pytest.mark.parametrize("overlay", ["prod", "silo-tenant"])
def test_mtls_overlays_mount_a_certificate_per_service(rendered, overlay: str) -> None:
    """With mTLS on, each service gets BULKHEAD_TLS_* pointing into its own certificate Secret."""
    objs = rendered[overlay]
    for svc in _services_in(overlay):
        spec = one(objs, "Deployment", svc)["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["tls"]["secret"]["secretName"] == f"bulkhead-{svc}-tls"
        for var, file in (
            ("BULKHEAD_TLS_CA", "ca.crt"),
            ("BULKHEAD_TLS_CERT", "tls.crt"),
            ("BULKHEAD_TLS_KEY", "tls.key"),
        ):
            assert env[var] == f"{mounts['tls']}/{file}"
    for svc in SERVICES:
        (container,) = one(rendered["dev"], "Deployment", svc)["spec"]["template"]["spec"]["containers"]
        assert not any(e["name"].startswith("BULKHEAD_TLS_") for e in container["env"])


def test_secret_references_resolve_in_dev(rendered) -> None:
    """Every Secret and key a dev workload references is generated by the dev overlay."""
    objs = rendered["dev"]
    for workload in find(objs, "Deployment") + find(objs, "StatefulSet"):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            for item in container.get("env") or ():
                ref = (item.get("valueFrom") or {}).get("secretKeyRef")
                if ref is None or ref.get("optional"):
                    continue
                secret = one(objs, "Secret", ref["name"])
                assert ref["key"] in secret.get("data", {}), (workload["metadata"]["name"], ref)


@pytest.mark.parametrize("overlay", ["prod", "silo-tenant"])
def test_replicas_share_keys_through_secrets(rendered, overlay: str) -> None:
    """Where services run several replicas, the keys every replica needs come from one Secret."""
    objs = rendered[overlay]
    orch = one(objs, "Deployment", "orchestrator")["spec"]["template"]["spec"]
    (container,) = orch["containers"]
    mounted = {m["mountPath"] for m in container["volumeMounts"] if m["name"] == "keys"}
    assert mounted == {"/var/lib/bulkhead/orchestrator-grant.key", "/var/lib/bulkhead/orchestrator-canary.key"}
    (proxy,) = one(objs, "Deployment", "inference")["spec"]["template"]["spec"]["containers"]
    salts = [m for m in proxy["volumeMounts"] if m["name"] == "keys"]
    assert [(m["mountPath"], m["subPath"]) for m in salts] == [
        (f"/var/lib/bulkhead/{SALT_FILE}", SALT_FILE)  # where load_or_create_salt reads it: no salt per pod
    ]
    if overlay == "prod":
        (container,) = one(objs, "Deployment", "identity")["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["BULKHEAD_IDENTITY_KEK_FILE"].startswith("/etc/bulkhead/keys/")


def test_kustomizations_name_only_existing_files() -> None:
    """Every resource, component and generator file a kustomization names exists (a typo breaks apply)."""
    import yaml

    for path in sorted(DEPLOY.rglob("kustomization.yaml")):
        spec = yaml.safe_load(path.read_text())
        names = [*spec.get("resources", ()), *spec.get("components", ())]
        names += [
            f.split("=", 1)[-1]
            for gen in (*spec.get("configMapGenerator", ()), *spec.get("secretGenerator", ()))
            for f in gen.get("files", ())
        ]
        names += [p["path"] for p in spec.get("patches", ()) if "path" in p]
        for name in names:
            assert (path.parent / name).exists(), f"{path.relative_to(DEPLOY)} names missing {name}"


def test_overlay_folders_are_the_documented_ones() -> None:
    """The overlays on disk are the ones the tests and README cover."""
    assert sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir()) == sorted(OVERLAYS)
    assert pathlib.Path(DEPLOY / "README.md").is_file()
