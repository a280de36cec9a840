"""The Tiered YAML rendered as a Ray Serve config, for `serve deploy` and KubeRay.

One application, `deployments.app:build`, receives the whole Tiered config inline in its
args (so nothing but the image and the weights must be on the nodes). Its deployments
section repeats the replica counts and autoscaling the builder will set, so operators
see them in the Serve config; both come from the same functions. `tiered config render`
and the Helm chart's test use this renderer. A dedicated tenant with a front door adds an
application of its own (`deployments.app:build_front_door`) under its route prefix.
"""

from __future__ import annotations

from typing import Any

from deployments.config.models import ReplicaSpec
from deployments.config.plan import (
    FINE_TUNING_DEPLOYMENT,
    INGRESS_DEPLOYMENT,
    MAIN_APP,
    deployment_plan,
    front_door_plan,
)
from deployments.config.tiered import TieredConfig

IMPORT_PATH = "deployments.app:build"
FRONT_DOOR_IMPORT_PATH = "deployments.app:build_front_door"


def _deployment(name: str, replica: ReplicaSpec, pool: str) -> dict[str, Any]:
    if replica.autoscaling:
        return {"name": name, "autoscaling_config": replica.autoscaling.serve_config(pool)}
    return {"name": name, "num_replicas": replica.num_replicas}


def deployment_options(config: TieredConfig) -> list[dict[str, Any]]:
    """Per deployment: the replica count or autoscaling config the app builder sets."""
    out: list[dict[str, Any]] = [
        {"name": INGRESS_DEPLOYMENT, "num_replicas": config.ingress.num_replicas},
        {"name": FINE_TUNING_DEPLOYMENT, "num_replicas": 1},
    ]
    out += [_deployment(p.deployment, p.replica, p.key) for p in deployment_plan(config)]
    return out


def render_serve_config(
    config: TieredConfig,
    *,
    runtime_env: dict[str, Any] | None = None,
    host: str = "0.0.0.0",
    port: int = 8000,
    with_deployment_options: bool = True,
) -> dict[str, Any]:
    """A `ServeDeploySchema`-shaped dict (the body of `serve deploy` and `serveConfigV2`).

    The Helm chart emits this shape without the deployments section (its templates do
    not reimplement the replica options; the app builder sets the same ones)."""
    tiered = config.model_dump(mode="json", exclude_none=True)
    if "url" not in config.state.model_fields_set:  # this machine's default path: the
        del tiered["state"]["url"]  # cluster picks its own (TIERED_STATE_URL, state dir)
    if "root" not in config.files.model_fields_set:  # likewise the files' directory
        del tiered["files"]["root"]
    app: dict[str, Any] = {
        "name": MAIN_APP,
        "route_prefix": "/",
        "import_path": IMPORT_PATH,
        "args": {"tiered": tiered},
    }
    if with_deployment_options:
        app["deployments"] = deployment_options(config)
    apps = [app]
    for door in front_door_plan(config):  # a tenant's own entry (deployments.api.front_door)
        entry: dict[str, Any] = {
            "name": door.app_name(MAIN_APP),
            "route_prefix": door.route_prefix,
            "import_path": FRONT_DOOR_IMPORT_PATH,
            "args": {"tiered": tiered, "tenant": door.tenant, "main_app": MAIN_APP},
        }
        if with_deployment_options:
            entry["deployments"] = [{"name": INGRESS_DEPLOYMENT, "num_replicas": door.num_replicas}]
        apps.append(entry)
    for entry in apps:
        if runtime_env:
            entry["runtime_env"] = runtime_env
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": port},
        "applications": apps,
    }
