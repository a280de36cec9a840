"""The chart refuses at `helm lint`/`helm template` time what the app would refuse in the
cluster: values.schema.json is generated from the pydantic models (and must be the
committed one), and templates/_checks.tpl fails on the rules between fields. Every case
goes through the real Helm engine (helm-python-sdk)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import helm_python as helm
import pytest
import yaml
from jsonschema import Draft202012Validator

from deployments.config.chart import SCHEMA_PATH, ChartValues, schema_text

CHART = Path(__file__).resolve().parent.parent / "helm" / "tiered"
DEFAULTS = yaml.safe_load((CHART / "values.yaml").read_text())
GPU_VALUES = yaml.safe_load((CHART / "values-gpu.yaml").read_text())
SCHEMA = Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))


def render(values: dict) -> dict[str, str]:
    return helm.Chart.load(CHART).render(values, name="demo", namespace="llm")


def test_the_committed_schema_is_the_generated_one() -> None:
    assert SCHEMA_PATH == CHART / "values.schema.json"
    assert SCHEMA_PATH.read_text() == schema_text(), (
        "helm/tiered/values.schema.json is stale: run `python -m deployments.config.chart`"
    )


@pytest.mark.parametrize("values", [DEFAULTS, {**DEFAULTS, **GPU_VALUES}], ids=["default", "gpu"])
def test_the_shipped_values_are_valid_chart_values(values: dict) -> None:
    ChartValues.model_validate(values)


def gpu(change: dict | None = None, **top: object) -> dict:
    """values-gpu.yaml with `tiered:` keys replaced by `change`, top-level keys by `top`."""
    values = copy.deepcopy(GPU_VALUES)
    values["tiered"].update(change or {})
    return {**values, **top}


GPU_TIERED = GPU_VALUES["tiered"]
ACME = GPU_TIERED["tenants"][0]


def acme(**dedicated: object) -> dict:
    tenant = copy.deepcopy(ACME)
    tenant["dedicated"].update(dedicated)
    return {"tenants": [tenant, *GPU_TIERED["tenants"][1:]]}


def shared_pool(**replica: object) -> dict:
    model = copy.deepcopy(GPU_TIERED["models"][0])
    model["shared_pool"].update(replica)
    return {"models": [model]}


def group(index: int, **fields: object) -> list[dict]:
    groups = copy.deepcopy(GPU_VALUES["workerGroups"])
    groups[index].update(fields)
    return groups


# Refused by values.schema.json, generated from the pydantic models.
SCHEMA_CASES = {
    "tiered-typo": (gpu({"tenantz": []}), "/tiered.*tenantz"),
    "model-typo": (gpu(shared_pool(tp_szie=4)), "tp_szie"),
    "engine-typo": (gpu({"models": [{**GPU_TIERED["models"][0], "engine": {"dtyp": "bf16"}}]}),
                    "dtyp"),
    "negative-ingress-replicas": (gpu({"ingress": {"num_replicas": -1}}),
                                  "/tiered/ingress/num_replicas"),
    "zero-ingress-replicas": (gpu({"ingress": {"num_replicas": 0}}),
                              "/tiered/ingress/num_replicas"),
    "tenant-name-with-space": (gpu({"tenants": [{"name": "bad name"}]}),
                               "/tiered/tenants/0/name"),
    "tenant-name-too-long": (gpu({"tenants": [{"name": "t" * 65}]}), "/tiered/tenants/0/name"),
    "bad-dtype": (gpu(shared_pool() | {"models": [{**GPU_TIERED["models"][0],
                  "engine": {"dtype": "int3"}}]}), "dtype"),
    "negative-reservation": (gpu(acme(reserved_replicas=-1)), "reserved_replicas"),
    "negative-replicas": (gpu(shared_pool(num_replicas=-2)), "num_replicas"),
    "no-model": (gpu({"models": []}), "/tiered/models"),
    "node-types-outside-worker-groups": (
        gpu({"node_types": {"x": {"resources": {"CPU": 1}, "max_workers": 1}}}), "node_types"),
    "negative-workers": (gpu(workerGroups=group(0, maxWorkers=-1)), "maxWorkers"),
    "group-name-not-dns": (gpu(workerGroups=group(0, name="Bad_Name")), "name"),
    "group-typo": (gpu(workerGroups=group(0, volumeMount=[])), "volumeMount"),
    "volume-without-name": (gpu(workerGroups=group(0, volumes=[{"hostPath": {"path": "/m"}}])),
                            "name"),
    "mount-without-path": (gpu(workerGroups=group(0, volumeMounts=[{"name": "models"}])),
                           "mountPath"),
    "gpu-fraction": (gpu(workerGroups=group(0, resources={"CPU": 48, "GPU": 0.5})), "GPU"),
    "bad-upgrade-strategy": (gpu(upgradeStrategy={"type": "Rolling"}), "upgradeStrategy"),
    "bad-cpu-fraction": (gpu(cpuRequestFraction=1.5), "cpuRequestFraction"),
    "monitoring-typo": (gpu(monitoring={"lables": {}}), "lables"),
    "bad-port": (gpu(service={"port": 0}), "/service/port"),
    "keys-bad-tenant": (gpu(apiKeys={"tenants": {"bad name": ["k"]}}), "apiKeys"),
    "keys-old-flat-form": (gpu(apiKeys={"keys": {"acme": ["k"]}}), "keys"),
    "state-secret-not-dns": (gpu(state={"existingSecret": "Tiered_State"}),
                             "/state/existingSecret"),
    "state-secret-trailing-dot": (gpu(state={"existingSecret": "tiered-state."}),
                                  "/state/existingSecret"),
    "state-secret-too-long": (gpu(state={"existingSecret": "s" * 254}), "/state/existingSecret"),
    "state-secret-key-empty": (gpu(state={"existingSecret": "s", "existingSecretKey": ""}),
                               "/state/existingSecretKey"),
    "state-url-as-a-value": (gpu(state={"url": "sqlite+aiosqlite:///t.db"}), "url"),
}  # fmt: skip


@pytest.mark.parametrize(("values", "message"), SCHEMA_CASES.values(), ids=SCHEMA_CASES.keys())
def test_the_schema_refuses(values: dict, message: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=message):
        render(values)
    report = helm.lint(str(CHART), values, strict=False)
    assert report["errors"], "helm lint passed values the schema refuses"


# Refused by templates/_checks.tpl: rules between fields, named like the app names them.
CHECK_CASES = {
    "dedicated-unknown-model": (
        gpu(acme(model="llama-70b")),
        r'tiered\.tenants\[0\]\.dedicated\.model: unknown model "llama-70b"'),
    "tenant-allowed-unknown-model": (
        gpu({"tenants": [{"name": "globex", "models": ["gpt-9"]}]}),
        r'tiered\.tenants\[0\]\.models\[0\]: unknown model "gpt-9"'),
    "duplicate-tenant": (
        gpu({"tenants": [{"name": "globex"}, {"name": "globex"}]}),
        r'tiered\.tenants\[1\]\.name: duplicate tenant "globex"'),
    "duplicate-model": (
        gpu({"models": GPU_TIERED["models"] * 2}), r"tiered\.models\[1\]\.name: duplicate"),
    "min-over-max-workers": (
        gpu(workerGroups=group(0, minWorkers=5, maxWorkers=4)),
        r"workerGroups\[0\]\.minWorkers: 5 exceeds maxWorkers=4"),
    "duplicate-group": (
        gpu(workerGroups=[*GPU_VALUES["workerGroups"], GPU_VALUES["workerGroups"][0]]),
        r'workerGroups\[2\]\.name: duplicate worker group "shared-gpu"'),
    "tp-larger-than-any-group": (
        gpu(acme(replica={**ACME["dedicated"]["replica"], "tp_size": 24})),
        r"tiered\.tenants\[0\]\.dedicated\.replica\.tp_size: 24 rank\(s\) need 24 GPU in all, "
        r'but the worker groups advertising "node_dedicated_acme" have 16'),
    "strict-pack-larger-than-a-node": (
        gpu(shared_pool(tp_size=8, placement_strategy="STRICT_PACK")),
        r"tiered\.models\[0\]\.shared_pool\.tp_size: 8 rank\(s\) need 8 GPU on one node, but "
        r'the worker groups advertising "node_shared" have 4'),
    "unadvertised-node-type-resource": (
        gpu(shared_pool(node_type_resource="node_h100")),
        r'tiered\.models\[0\]\.shared_pool\.node_type_resource: no worker group advertises '
        r'"node_h100"'),
}  # fmt: skip


@pytest.mark.parametrize(("values", "message"), CHECK_CASES.values(), ids=CHECK_CASES.keys())
def test_the_templates_refuse(values: dict, message: str) -> None:
    """`helm template` (and install, upgrade) refuse. Helm v4's lint only logs a template's
    `fail` (at INFO), so these rules show there as a log line, not a lint error."""
    assert SCHEMA.is_valid(values)  # each field alone is fine: the rule is between them
    with pytest.raises(helm.HelmRenderError, match=message):
        render(values)


def test_a_tp_group_that_spans_nodes_of_one_group_passes() -> None:
    """PACK may put the ranks on several nodes: 8 ranks on two 4-GPU nodes fit."""
    manifests = render(gpu(shared_pool(tp_size=8)))
    service = yaml.safe_load(manifests["tiered/templates/rayservice.yaml"])
    tiered = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert tiered["tiered"]["models"][0]["shared_pool"]["tp_size"] == 8


def test_the_schema_is_the_apps_own_for_the_tiered_block() -> None:
    """tiered: is TieredConfig's schema (one source), less node_types."""
    schema = json.loads(SCHEMA_PATH.read_text())
    tiered = schema["$defs"]["TieredConfig"]
    assert tiered["additionalProperties"] is False
    assert "node_types" not in tiered["properties"]
    assert schema["properties"]["tiered"]["$ref"] == "#/$defs/TieredConfig"
    tenant = schema["$defs"]["TenantSpec"]["properties"]["name"]
    assert tenant["pattern"] == "^[A-Za-z0-9_.-]+$" and tenant["maxLength"] == 64
