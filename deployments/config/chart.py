"""The Helm chart's values (helm/tiered/values.yaml) as pydantic models: the one source of
the chart's values.schema.json, so `helm lint` and `helm template` refuse what the app
would refuse, field by field. `tiered:` is the Tiered config itself (TieredConfig), less
`node_types`, which the chart writes from `workerGroups`.

Rules between fields (a dedicated tenant's model exists, a replica's GPUs and node-type
resource are on some worker group, minWorkers <= maxWorkers) are beyond JSON Schema: the
chart's templates/_checks.tpl fails the render on each.

    python -m deployments.config.chart            # rewrites helm/tiered/values.schema.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from deployments.config.tenants import TenantName
from deployments.config.tiered import TieredConfig

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "helm" / "tiered" / "values.schema.json"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# A URL with a password (user:pass@ or ?password=): tiered.state is rendered in plain text.
URL_WITH_SECRET = [r"://[^/@]*:[^/@]*@", r"[?&]password="]
Quantity = Annotated[str, StringConstraints(pattern=r"^[0-9.]+[a-zA-Z]*$")]
Port = Annotated[int, Field(ge=1, le=65535)]
Labels = dict[str, str]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Passthrough(BaseModel):
    """A Kubernetes object of its own shape (volume, mount, toleration), passed as written."""

    model_config = ConfigDict(extra="allow")


class Volume(Passthrough):
    """A pod volume, Kubernetes' shape: `name` plus one source (persistentVolumeClaim,
    hostPath, ...)."""

    name: Annotated[str, StringConstraints(max_length=63, pattern=DNS_LABEL)]


class VolumeMount(Passthrough):
    """A container's volumeMount, Kubernetes' shape."""

    name: str = Field(min_length=1)
    mountPath: str = Field(min_length=1)


class Image(Strict):
    repository: str = Field(min_length=1)
    tag: str = Field(min_length=1)
    pullPolicy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"


class RayResources(BaseModel):
    """What Ray is told one node of the group has: CPU, GPU and custom resources."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, Annotated[float, Field(ge=0)]]

    CPU: float = Field(gt=0)
    GPU: int = Field(0, ge=0)


class Pod(Strict):
    """What every pod of a group runs with besides Ray: scheduling and storage."""

    nodeSelector: Labels = {}
    tolerations: list[Passthrough] = []
    volumes: list[Volume] = []
    volumeMounts: list[VolumeMount] = Field(
        [], description="Mounts in the Ray container, e.g. the weights' volume."
    )


class WorkerGroup(Pod):
    """One KubeRay worker group: one node type of the Tiered config."""

    name: Annotated[str, StringConstraints(max_length=40, pattern=DNS_LABEL)]
    resources: RayResources
    minWorkers: int = Field(0, ge=0)
    maxWorkers: int = Field(ge=0)
    memory: Quantity = Field("16Gi", description="The container's memory request and limit.")
    cpuRequest: Quantity | None = Field(
        None,
        description="The container's CPU request; default: cpuRequestFraction of "
        "resources.CPU, leaving the node's kubelet and daemons room.",
    )


class Head(Pod):
    resources: dict[str, Quantity | int] = Field(
        default_factory=dict, description="The head container's requests and limits."
    )


class Autoscaling(Strict):
    enabled: bool = True
    idleTimeoutSeconds: int = Field(300, ge=0)


class UpgradeStrategy(Strict):
    type: Literal["NewCluster", "None"] = Field(
        "NewCluster",
        description="NewCluster: a new RayCluster takes the traffic once ready; None: never.",
    )


class Serve(Strict):
    port: Port = 8000


class ApiKeys(Strict):
    existingSecret: str = ""
    tenants: dict[TenantName, list[Annotated[str, StringConstraints(min_length=1)]]] = Field(
        {}, json_schema_extra={"additionalProperties": False}
    )
    admin: list[Annotated[str, StringConstraints(min_length=1)]] = []


class State(Strict):
    """The state store: a Secret of yours holding the database URL, injected as
    TIERED_STATE_URL into every Ray container. The URL is never a value."""

    existingSecret: str = Field(
        "",
        max_length=253,
        pattern=f"^$|{DNS_SUBDOMAIN}",
        description="A Secret name (DNS-1123 subdomain), or empty for the embedded SQLite.",
    )
    existingSecretKey: str = Field(
        "url", min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$"
    )


class Service(Strict):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    port: Port = 8000


class Ingress(Strict):
    enabled: bool = False
    className: str = ""
    host: str = Field("tiered.example.internal", min_length=1)
    tls: list[Passthrough] = []
    annotations: Labels = {}


class Toggle(Strict):
    enabled: bool = True


class PodMonitor(Toggle):
    interval: str = Field("15s", pattern=r"^[0-9]+(ms|s|m|h)$")


class Monitoring(Strict):
    labels: Labels = Field(
        {}, description="On the PodMonitor, PrometheusRule and dashboards, e.g. the "
        "`release: <name>` kube-prometheus-stack selects on."
    )
    podMonitor: PodMonitor = PodMonitor()
    prometheusRule: Toggle = Toggle()
    dashboards: Toggle = Toggle()


class ChartValues(Strict):
    fullnameOverride: str = Field("", max_length=40, pattern=f"^$|{DNS_LABEL}")
    image: Image
    tiered: TieredConfig = Field(
        description="The Tiered YAML: models, tenants, limits (validated again by the app "
        "at load). Its node types come from workerGroups."
    )
    workerGroups: list[WorkerGroup] = Field(min_length=1)
    cpuRequestFraction: float = Field(
        0.9, gt=0, le=1, description="A worker container's CPU request over its Ray CPUs."
    )
    head: Head = Head()
    autoscaling: Autoscaling = Autoscaling()
    upgradeStrategy: UpgradeStrategy = UpgradeStrategy()
    serve: Serve = Serve()
    apiKeys: ApiKeys = ApiKeys()
    state: State = State()
    service: Service = Service()
    ingress: Ingress = Ingress()
    monitoring: Monitoring = Monitoring()


def _chart_only(tiered: dict[str, Any]) -> None:
    """The Tiered config as the chart takes it: node_types come from the worker groups,
    so a value of its own is refused (additionalProperties is false)."""
    del tiered["properties"]["node_types"]


def _refuse_secret_urls(state: dict[str, Any]) -> None:
    url = state["properties"]["url"]
    url["not"] = {"anyOf": [{"pattern": p} for p in URL_WITH_SECRET]}
    url["description"] = (
        "A URL without a secret only (the chart renders it in plain text); "
        "TIERED_STATE_URL from state.existingSecret overrides it."
    )


def chart_schema() -> dict[str, Any]:
    schema = ChartValues.model_json_schema()
    _chart_only(schema["$defs"]["TieredConfig"])
    _refuse_secret_urls(schema["$defs"]["StateSpec"])
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def schema_text() -> str:
    return json.dumps(chart_schema(), indent=2) + "\n"


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else SCHEMA_PATH
    path.write_text(schema_text())
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
