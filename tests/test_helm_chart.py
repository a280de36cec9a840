"""The Helm chart, through helm-python-sdk (Helm v4's own engine): lint, render, schema,
and the RayService's Serve config and worker groups checked like the `ray up` path."""

from __future__ import annotations

import json
import re
from pathlib import Path

import helm_python as helm
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from deployments.config.tiered import TieredConfig, parse_config
from deployments.observability.generate import artifacts
from deployments.render import render_serve_config
from deployments.replicas.capacity import reservation_problems
from deployments.tenancy.keys import ENV_KEYS_FILE, hash_key, load_key_rings

CHART = Path(__file__).resolve().parent.parent / "helm" / "tiered"
GPU_VALUES = yaml.safe_load((CHART / "values-gpu.yaml").read_text())
KEYS_FILE = "/etc/tiered/keys/keys.yaml"


def render(values: dict | None = None) -> list[dict]:
    manifests = helm.Chart.load(CHART).render(values or {}, name="demo", namespace="llm")
    docs = []
    for path, text in manifests.items():
        if path.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, (kind, [d["kind"] for d in docs])
    return found[0]


@pytest.mark.parametrize("values", [None, GPU_VALUES], ids=["default", "gpu"])
def test_lint_reports_no_errors(values: dict | None) -> None:
    report = helm.lint(str(CHART), values, strict=False)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def _with_front_door(values: dict) -> dict:
    values = json.loads(json.dumps(values))
    values["tiered"]["tenants"][0]["dedicated"]["front_door"] = {"num_replicas": 2}
    return values


DOOR_VALUES = _with_front_door(helm.Chart.load(CHART).values)


@pytest.mark.parametrize(
    "values", [None, GPU_VALUES, DOOR_VALUES], ids=["default", "gpu", "front-door"]
)
def test_manifests_parse_and_serve_config_validates(values: dict | None) -> None:
    docs = render(values)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds.count("ConfigMap") == 3 and "PodMonitor" in kinds
    chart_tenants = (values or helm.Chart.load(CHART).values)["tiered"]["tenants"]
    doors = [t for t in chart_tenants if (t.get("dedicated") or {}).get("front_door")]
    assert kinds.count("Service") == len(doors)  # one per front door
    service = one(docs, "RayService")
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema(**serve_config)
    chart_values = values or helm.Chart.load(CHART).values
    tiered = {**chart_values["tiered"], "node_types": node_types_of(chart_values)}
    config = parse_config(tiered, checkpoints=False)
    expected = render_serve_config(
        config,
        runtime_env={"env_vars": {"TIERED_API_KEYS_FILE": KEYS_FILE}},
        with_deployment_options=False,
    )
    # The same renderer's output; the chart passes the values as written, the renderer
    # with defaults filled in, so the Tiered configs are compared once parsed.
    assert len(serve_config["applications"]) == len(expected["applications"])
    for got, want in zip(serve_config["applications"], expected["applications"], strict=True):
        got_args, want_args = got["args"].pop("tiered"), want["args"].pop("tiered")
        assert TieredConfig.model_validate(got_args) == TieredConfig.model_validate(want_args)
    assert serve_config == expected


def test_a_front_door_gets_a_service_on_its_tenants_worker_group() -> None:
    """acme's Service selects the pods of the group advertising acme's node type, where
    its door (the tiered--acme application) runs; a door without a node type is refused."""
    docs = render(DOOR_VALUES)
    door = one(docs, "Service")
    assert door["metadata"]["name"] == "demo-tiered-acme"
    assert door["spec"]["selector"]["tiered.io/node-type"] == "acme-cpu"
    assert door["spec"]["selector"]["ray.io/serve"] == "true"
    groups = one(docs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    acme = next(g for g in groups if g["groupName"] == "acme-cpu")
    pod_labels = acme["template"]["metadata"]["labels"]
    assert {k: v for k, v in door["spec"]["selector"].items() if k != "ray.io/serve"} == {
        k: pod_labels[k] for k in door["spec"]["selector"] if k != "ray.io/serve"
    }
    apps = yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])["applications"]
    assert [(a["name"], a["route_prefix"]) for a in apps] == [
        ("tiered", "/"), ("tiered--acme", "/tenants/acme")
    ]
    unplaced = json.loads(json.dumps(DOOR_VALUES))
    del unplaced["tiered"]["tenants"][0]["dedicated"]["replica"]["node_type_resource"]
    needs = re.escape("front_door: needs dedicated.replica.node_type_resource")
    with pytest.raises(helm.HelmRenderError, match=needs):
        render(unplaced)


def node_types_of(values: dict) -> dict[str, dict]:
    """The Tiered node types the values' worker groups stand for."""
    return {
        g["name"]: {
            "resources": g["resources"],
            "min_workers": g.get("minWorkers", 0),
            "max_workers": g["maxWorkers"],
        }
        for g in values["workerGroups"]
    }


def test_a_values_file_replaces_the_default_worker_groups() -> None:
    """Helm merges maps: node types kept in a map would add the CPU defaults to a GPU
    install. As a list, the GPU file's groups are the only ones."""
    service = one(render(GPU_VALUES), "RayService")
    groups = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert [g["groupName"] for g in groups] == ["shared-gpu", "dedicated-acme"]
    args = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert set(args["tiered"]["node_types"]) == {"shared-gpu", "dedicated-acme"}
    acme = groups[1]["template"]["spec"]
    assert acme["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert acme["tolerations"][1]["key"] == "tiered.io/tenant"


def worker_node_types(service: dict) -> dict[str, dict]:
    """What each worker group tells Ray (KubeRay's workerGroupSpecs[].resources, strings
    as KubeRay takes them); at most maxReplicas nodes."""
    return {
        group["groupName"]: {
            "resources": {k: float(v) for k, v in group["resources"].items()},
            "min_workers": group["minReplicas"],
            "max_workers": group["maxReplicas"],
        }
        for group in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    }


@pytest.mark.parametrize("values", [None, GPU_VALUES], ids=["default", "gpu"])
def test_worker_groups_hold_every_reservation(values: dict | None) -> None:
    service = one(render(values), "RayService")
    tiered = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
    data = {**tiered["tiered"], "node_types": worker_node_types(service)}
    config = parse_config(data, checkpoints=False)
    assert reservation_problems(config) == []
    autoscaler = service["spec"]["rayClusterConfig"]
    assert autoscaler["enableInTreeAutoscaling"] is True
    assert all(g["minReplicas"] <= g["maxReplicas"] for g in autoscaler["workerGroupSpecs"])


def test_worker_groups_too_small_for_a_reservation_are_caught() -> None:
    values = yaml.safe_load(yaml.safe_dump(GPU_VALUES))
    values["tiered"]["tenants"][0]["dedicated"].update(reserved_replicas=3, max_replicas=3)
    service = one(render(values), "RayService")
    tiered = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
    config = parse_config(
        {**tiered["tiered"], "node_types": worker_node_types(service)}, checkpoints=False
    )
    assert any("hold only 2" in p for p in reservation_problems(config))


def test_keys_secret_or_existing_secret(tmp_path: Path) -> None:
    """The chart-made Secret is a key file the app reads: tenant keys by tenant, admin keys
    apart, so a tenant named "admin" stays a tenant."""
    tenant, admin = hash_key("tk-tenant"), hash_key("tk-admin")
    docs = render({"apiKeys": {"tenants": {"admin": [tenant]}, "admin": [admin]}})
    text = one(docs, "Secret")["stringData"]["keys.yaml"]
    assert yaml.safe_load(text) == {"tenants": {"admin": [tenant]}, "admin": [admin]}
    (tmp_path / "keys.yaml").write_text(text)
    config = TieredConfig.model_validate(
        {"models": [{"name": "m", "path": "default:tiny"}], "tenants": [{"name": "admin"}]}
    )
    rings = load_key_rings(config, {ENV_KEYS_FILE: str(tmp_path / "keys.yaml")})
    assert rings.tenants.tenant_for("tk-tenant") == "admin"
    assert rings.admin.tenant_for("tk-tenant") is None and rings.admin.tenant_for("tk-admin")
    empty = yaml.safe_load(one(render(), "Secret")["stringData"]["keys.yaml"])
    assert empty == {"tenants": {}, "admin": []}
    with pytest.raises(helm.HelmValuesError, match="keys"):  # the old flat form, refused
        render({"apiKeys": {"keys": {"acme": [tenant]}}})
    docs = render({"apiKeys": {"existingSecret": "mine"}})
    assert not [d for d in docs if d["kind"] == "Secret"]
    head = one(docs, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    assert head["spec"]["volumes"][0]["secret"]["secretName"] == "mine"


def test_monitoring_objects_carry_the_generated_rules_and_dashboards() -> None:
    docs = render(GPU_VALUES)
    rules = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    assert one(docs, "PrometheusRule")["spec"]["groups"] == rules["groups"]
    generated = {p.name: text for p, text in artifacts().items() if p.suffix == ".json"}
    boards = [d for d in docs if d["kind"] == "ConfigMap"]
    assert all(b["metadata"]["labels"]["grafana_dashboard"] == "1" for b in boards)
    shipped = {k.removeprefix("tiered-"): v for b in boards for k, v in b["data"].items()}
    assert {k: json.loads(v) for k, v in shipped.items()} == {
        k: json.loads(v) for k, v in generated.items()
    }
    ingress = one(docs, "Ingress")
    assert ingress["spec"]["rules"][0]["host"] == "llm.example.internal"


STATE_SECRET = {"state": {"existingSecret": "tiered-state"}}
STATE_ENV = "TIERED_STATE_URL"


def ray_containers(docs: list[dict]) -> dict[str, dict]:
    """Every Ray container of the RayService (head, then one per worker group)."""
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    pods = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    pods |= {g["groupName"]: g["template"]["spec"] for g in cluster["workerGroupSpecs"]}
    out = {}
    for pod, spec in pods.items():
        for container in spec["containers"]:
            out[f"{pod}/{container['name']}"] = container
    return out


def state_env(container: dict) -> list[dict]:
    return [e for e in container.get("env", []) if e["name"] == STATE_ENV]


@pytest.mark.parametrize(
    ("state", "key"),
    [({"existingSecret": "tiered-state"}, "url"),
     ({"existingSecret": "db.creds", "existingSecretKey": "state-url"}, "state-url")],
    ids=["default-key", "own-key"],
)  # fmt: skip
def test_every_ray_container_reads_the_state_url_from_the_secret(state: dict, key: str) -> None:
    """The ingress replicas and the admission actor may run on any Ray pod: the head and
    every worker group get TIERED_STATE_URL, from the Secret alone."""
    containers = ray_containers(render({**GPU_VALUES, "state": state}))
    assert sorted(containers) == [
        "dedicated-acme/ray-worker",
        "head/ray-head",
        "shared-gpu/ray-worker",
    ]
    for name, container in containers.items():
        assert state_env(container) == [
            {"name": STATE_ENV,
             "valueFrom": {"secretKeyRef": {"name": state["existingSecret"], "key": key}}}
        ], name  # fmt: skip
        keys = [e for e in container["env"] if e["name"] == "TIERED_API_KEYS_FILE"]
        assert keys == [{"name": "TIERED_API_KEYS_FILE", "value": KEYS_FILE}], name


@pytest.mark.parametrize("values", [None, GPU_VALUES], ids=["default", "gpu"])
def test_without_a_secret_no_container_gets_a_state_url(values: dict | None) -> None:
    docs = render(values)
    assert all(state_env(c) == [] for c in ray_containers(docs).values())
    assert STATE_ENV not in yaml.safe_dump_all(docs)
    notes = notes_of(values)
    assert "WARNING: no state store configured" in notes and "usage is lost" in notes


def notes_of(values: dict | None) -> str:
    manifests = helm.Chart.load(CHART).render(values or {}, name="demo", namespace="llm")
    return manifests["tiered/templates/NOTES.txt"]


def test_notes_name_the_state_secret() -> None:
    notes = notes_of({**GPU_VALUES, **STATE_SECRET})
    assert "WARNING" not in notes
    assert "TIERED_STATE_URL from Secret tiered-state\n(key url)" in notes


def test_no_manifest_holds_the_state_url() -> None:
    """The URL (and its password) lives in the Secret only: no ConfigMap, no Serve config
    (the RayService's serveConfigV2), no plain env value carries one; a password-less
    tiered.state passes through into the Tiered config."""
    state = {"migrate": True, "url": "postgresql+psycopg://tiered@pg.db.svc:5432/tiered"}
    values = {**GPU_VALUES, **STATE_SECRET, "tiered": {**GPU_VALUES["tiered"], "state": state}}
    docs = render(values)
    secret_in_url = re.compile(r"://[^/@\s]*:[^/@\s]*@")
    for doc in docs:
        assert not secret_in_url.search(yaml.safe_dump(doc)), doc["kind"]
    assert not [
        d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == "tiered-state"
    ]
    assert len([d for d in docs if d["kind"] == "ConfigMap"]) == 3
    serve_config = yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])
    app = serve_config["applications"][0]
    assert app["runtime_env"] == {"env_vars": {"TIERED_API_KEYS_FILE": KEYS_FILE}}
    assert app["args"]["tiered"]["state"] == state
    containers = ray_containers(docs).values()
    assert all("value" not in e for c in containers for e in state_env(c))
    assert sum(len(state_env(c)) for c in containers) == 3


@pytest.mark.parametrize(
    "url",
    ["postgresql+psycopg://tiered:hunter2-pw@pg.db.svc:5432/tiered",
     "postgresql+psycopg://:hunter2-pw@pg:5432/tiered",
     "postgresql+psycopg://pg:5432/tiered?user=tiered&password=hunter2-pw"],
    ids=["userinfo", "empty-user", "query"],
)  # fmt: skip
def test_schema_refuses_a_password_in_the_tiered_config(url: str) -> None:
    """tiered.state is rendered into the RayService in plain text: a URL with a password
    is refused, and the refusal does not repeat it."""
    values = {"tiered": {**GPU_VALUES["tiered"], "state": {"url": url}}}
    with pytest.raises(helm.HelmValuesError, match="/tiered/state/url") as refused:
        render(values)
    assert "hunter2" not in str(refused.value)


def test_lint_with_a_state_secret() -> None:
    report = helm.lint(str(CHART), {**GPU_VALUES, **STATE_SECRET}, strict=False)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []
