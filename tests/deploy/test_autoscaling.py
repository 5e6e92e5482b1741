"""Scale-out in Kubernetes (issue 17): an autoscaler per service, replicas spread over nodes and zones,
and headless Services so callers' round_robin sees every pod."""

from __future__ import annotations

import pytest

from shared.config import SERVICES
from tests.deploy.k8s_helpers import K8S, OVERLAYS, find, one, render


@pytest.fixture(scope="module")
def rendered() -> dict[str, list]:
    return {name: render(K8S / "overlays" / name) for name in OVERLAYS} | {"base": render(K8S / "base")}


def _services_in(overlay: str) -> tuple[str, ...]:
    return tuple(s for s in SERVICES if not (overlay == "silo-tenant" and s == "identity"))


@pytest.mark.parametrize("overlay", ("base", *OVERLAYS))
def test_every_service_has_an_autoscaler_on_its_deployment(rendered, overlay: str) -> None:
    """One HPA per service, on CPU, aimed at that service's Deployment, with a floor no lower than it runs."""
    objs = rendered[overlay]
    hpas = find(objs, "HorizontalPodAutoscaler")
    assert sorted(h["metadata"]["name"] for h in hpas) == sorted(_services_in(overlay))
    for svc in _services_in(overlay):
        spec = one(objs, "HorizontalPodAutoscaler", svc)["spec"]
        assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": svc}
        assert one(objs, "Deployment", svc)  # the target exists in this overlay
        assert spec["metrics"][0]["resource"]["name"] == "cpu"
        assert 1 <= spec["minReplicas"] <= spec["maxReplicas"]


def test_autoscaler_floors_match_each_overlays_replicas(rendered) -> None:
    """prod never scales below its three replicas; dev stays at one (single-writer key volumes); base at two."""
    for svc in SERVICES:
        assert one(rendered["prod"], "HorizontalPodAutoscaler", svc)["spec"]["minReplicas"] == 3
        dev = one(rendered["dev"], "HorizontalPodAutoscaler", svc)["spec"]
        assert dev["minReplicas"] == dev["maxReplicas"] == 1
        assert one(rendered["base"], "HorizontalPodAutoscaler", svc)["spec"]["minReplicas"] == 2


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_replicas_spread_over_nodes_and_zones_behind_headless_services(rendered, overlay: str) -> None:
    """Pods of a service spread by host and by zone; its Service has no virtual IP, so DNS names every pod."""
    objs = rendered[overlay]
    for svc in _services_in(overlay):
        spread = one(objs, "Deployment", svc)["spec"]["template"]["spec"]["topologySpreadConstraints"]
        assert [c["topologyKey"] for c in spread] == ["kubernetes.io/hostname", "topology.kubernetes.io/zone"]
        assert all(c["labelSelector"]["matchLabels"]["app.kubernetes.io/name"] == svc for c in spread)
        assert one(objs, "Service", svc)["spec"]["clusterIP"] == "None"
