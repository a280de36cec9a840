"""The chart as KubeRay and kube-prometheus-stack expect it: Ray's view of a
node is KubeRay's workerGroupSpecs[].resources apart from what the pod requests, traffic
goes through KubeRay's Serve Service, and the monitors carry the labels Prometheus
selects on."""

from __future__ import annotations

from pathlib import Path

import helm_python as helm
import pytest
import yaml

CHART = Path(__file__).resolve().parent.parent / "helm" / "tiered"
GPU_VALUES = yaml.safe_load((CHART / "values-gpu.yaml").read_text())


def render(values: dict | None = None, name: str = "demo") -> list[dict]:
    manifests = helm.Chart.load(CHART).render(values or {}, name=name, namespace="llm")
    return [d for p, t in manifests.items() if p.endswith(".yaml")
            for d in yaml.safe_load_all(t) if d]  # fmt: skip


def rayservice(docs: list[dict]) -> dict:
    (found,) = [d for d in docs if d["kind"] == "RayService"]
    return found


def test_ray_is_told_the_whole_node_and_the_pod_asks_for_less() -> None:
    """g5.12xlarge: Ray gets its 48 CPUs and 4 GPUs; the pod requests 90 % of the CPUs,
    so it fits beside the kubelet and daemons, and limits at 48."""
    groups = rayservice(render(GPU_VALUES))["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    shared = groups[0]
    assert shared["resources"] == {"CPU": "48", "GPU": "4", "node_shared": "1"}
    assert "resources" not in shared["rayStartParams"]  # no escaped JSON string
    pod = shared["template"]["spec"]["containers"][0]["resources"]
    assert pod["requests"] == {"cpu": "43200m", "memory": "180Gi", "nvidia.com/gpu": "4"}
    assert pod["limits"] == {"cpu": "48", "memory": "180Gi", "nvidia.com/gpu": "4"}
    values = {**GPU_VALUES, "cpuRequestFraction": 0.5}
    values["workerGroups"] = [{**GPU_VALUES["workerGroups"][0], "cpuRequest": "40"},
                              GPU_VALUES["workerGroups"][1]]  # fmt: skip
    groups = rayservice(render(values))["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    requests = [g["template"]["spec"]["containers"][0]["resources"]["requests"] for g in groups]
    assert [r["cpu"] for r in requests] == ["40", "48000m"]


def test_traffic_goes_through_kuberays_serve_service() -> None:
    """KubeRay points <name>-serve-svc at the serving cluster only, so an upgrade never
    sends traffic to both clusters; the chart's only Services are the front doors' (a
    dedicated tenant's own entry, on its worker group's pods)."""
    values = {**GPU_VALUES, "service": {"type": "LoadBalancer", "port": 80}}
    docs = render(values, name="prod")
    services = [d for d in docs if d["kind"] == "Service"]
    assert [s["metadata"]["labels"]["tiered.io/tenant"] for s in services] == ["acme"]
    spec = rayservice(docs)["spec"]
    assert spec["upgradeStrategy"] == {"type": "NewCluster"}
    assert spec["serveService"]["metadata"]["name"] == "prod-tiered-serve-svc"
    assert spec["serveService"]["spec"]["type"] == "LoadBalancer"
    assert spec["serveService"]["spec"]["ports"] == [
        {"name": "serve", "port": 80, "targetPort": 8000}]  # fmt: skip
    (ingress,) = [d for d in docs if d["kind"] == "Ingress"]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "prod-tiered-serve-svc", "port": {"number": 80}}
    none = rayservice(render({**GPU_VALUES, "upgradeStrategy": {"type": "None"}}))
    assert none["spec"]["upgradeStrategy"] == {"type": "None"}


@pytest.mark.parametrize(
    ("release", "override", "name"),
    [("tiered", "", "tiered"), ("prod", "", "prod-tiered"), ("tiered-prod", "", "tiered-prod"),
     ("prod", "llm", "llm")],
)  # fmt: skip
def test_names_are_not_doubled(release: str, override: str, name: str) -> None:
    docs = render({"fullnameOverride": override}, name=release)
    assert rayservice(docs)["metadata"]["name"] == name
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "PodMonitor"} == {name}


def test_monitoring_objects_carry_the_configured_labels() -> None:
    docs = render(GPU_VALUES)
    kinds = {"PodMonitor", "PrometheusRule", "ConfigMap"}
    monitors = [d for d in docs if d["kind"] in kinds]
    assert {d["kind"] for d in monitors} == kinds
    for doc in monitors:
        assert doc["metadata"]["labels"]["release"] == "kube-prometheus-stack", doc["kind"]
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == "demo"
    plain = [d for d in render() if d["kind"] == "PodMonitor"]
    assert "release" not in plain[0]["metadata"]["labels"]


def test_weights_reach_the_workers_through_their_volumes() -> None:
    """values-gpu.yaml mounts the models PVC in every GPU worker, read-only, next to the
    keys; the head, which runs no replica, mounts only the keys."""
    cluster = rayservice(render(GPU_VALUES))["spec"]["rayClusterConfig"]
    for group in cluster["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        assert pod["volumes"][1] == {
            "name": "models",
            "persistentVolumeClaim": {"claimName": "tiered-models", "readOnly": True},
        }
        mounts = pod["containers"][0]["volumeMounts"]
        assert [m["mountPath"] for m in mounts] == ["/etc/tiered/keys", "/mnt/models"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert [v["name"] for v in head["volumes"]] == ["api-keys"]
    host = {"name": "models", "hostPath": {"path": "/opt/models", "type": "Directory"}}
    values = {**GPU_VALUES, "head": {**GPU_VALUES["head"], "volumes": [host],
              "volumeMounts": [{"name": "models", "mountPath": "/opt/models"}]}}  # fmt: skip
    head = rayservice(render(values))["spec"]["rayClusterConfig"]["headGroupSpec"]
    spec = head["template"]["spec"]
    assert spec["volumes"][1] == host
    assert spec["containers"][0]["volumeMounts"][1] == {"name": "models",
                                                        "mountPath": "/opt/models"}  # fmt: skip


def test_notes_warn_of_tenants_without_a_key() -> None:
    def notes(values: dict) -> str:
        manifests = helm.Chart.load(CHART).render(values, name="demo", namespace="llm")
        return manifests["tiered/templates/NOTES.txt"]

    assert "tenant(s) without an API key, refused with 401: acme, globex" in notes({})
    keyed = {"apiKeys": {"tenants": {"acme": ["sha256:" + "a" * 64]}}}
    assert "refused with 401: globex\n" in notes(keyed)
    both = {"apiKeys": {"tenants": {"acme": ["k1"], "globex": ["k2"]}}}
    assert "without an API key" not in notes(both)
    assert "without an API key" not in notes({"apiKeys": {"existingSecret": "mine"}})
