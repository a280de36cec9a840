"""The Tiered YAML rendered as a Ray Serve config, for `serve deploy` and KubeRay.

One application, `deployments.app:build`, receives the whole Tiered config inline in its
args (so nothing but the image and the weights must be on the nodes). Its deployments
section repeats the replica counts and autoscaling the builder will set, so operators
see them in the Serve config; both come from the same functions. `tiered config render`
and the Helm chart's test use this renderer.
"""

from __future__ import annotations

from typing import Any

from deployments.config.models import ReplicaSpec
from deployments.config.plan import FINE_TUNING_DEPLOYMENT, INGRESS_DEPLOYMENT, deployment_plan
from deployments.config.tiered import TieredConfig

APP_NAME = "tiered"
IMPORT_PATH = "deployments.app:build"


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
        "name": APP_NAME,
        "route_prefix": "/",
        "import_path": IMPORT_PATH,
        "args": {"tiered": tiered},
    }
    if with_deployment_options:
        app["deployments"] = deployment_options(config)
    if runtime_env:
        app["runtime_env"] = runtime_env
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": port},
        "applications": [app],
    }
