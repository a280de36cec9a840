"""The app builder: one Tiered YAML in, one Serve application out.

`serve run deployments.app:build config=my.yaml` or `tiered serve` (whose default is
deployments/config/serve-default.yaml, shipped in the package).
It deploys every model server of the plan (a shared pool per model, a private copy per
dedicated tenant, pinned by its node-type resource when set), the fine-tuning runner, and
the ingress, which receives a handle to each model server, keyed by pool, and the runner's.
A dedicated tenant with a `front_door` also gets an application of its own
(`build_front_door`): its ingress replicas under its own route prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ray import serve

from deployments.api.ingress import DRAIN_TIMEOUT_S, Ingress
from deployments.config.models import ConfigError
from deployments.config.plan import (
    FINE_TUNING_DEPLOYMENT,
    INGRESS_DEPLOYMENT,
    MAIN_APP,
    deployment_plan,
    front_door_plan,
)
from deployments.config.tiered import TieredConfig, load_config, parse_config
from deployments.replicas.model_server import model_server_app
from deployments.tenancy.admission import INGRESS_HEARTBEAT_S
from deployments.tenancy.policy import admission_shards
from deployments.training.runner import FineTuningRunner


@dataclass(frozen=True)
class ServeApp:
    """One Serve application to deploy: the main one, or a tenant's front door."""

    name: str
    route_prefix: str
    app: serve.Application
    tenant: str | None = None  # whose front door it is; None: the main application


def build_from_config(config: TieredConfig) -> serve.Application:
    names = [m.name for m in config.models]
    shards = set(admission_shards(config))
    handles = {
        plan.key: model_server_app(
            plan.model,
            plan.replica,
            plan.deployment,
            pool=plan.key,
            report=True,
            where=plan.where,
            model_where=f"models[{names.index(plan.model.name)}]",
            shard=plan.tenant if plan.tenant in shards else None,
        )
        for plan in deployment_plan(config)
    }
    ingress = serve.deployment(Ingress).options(  # type: ignore[attr-defined]
        **_ingress_options(config)
    )
    runner = serve.deployment(FineTuningRunner).options(  # type: ignore[attr-defined]
        name=FINE_TUNING_DEPLOYMENT,
        num_replicas=1,
        ray_actor_options=_placed(config.ingress.node_type_resource),
        max_ongoing_requests=100,
    )
    return ingress.bind(config.model_dump(), handles, runner.bind(config.model_dump()))


def _placed(resource: str | None) -> dict[str, Any]:
    """Ray actor options of a zero-CPU actor, pinned to a node type when one is named."""
    return {"num_cpus": 0} | ({"resources": {resource: 0.001}} if resource else {})


def _ingress_options(config: TieredConfig) -> dict[str, Any]:
    spread = config.ingress.max_replicas_per_node
    return ({"max_replicas_per_node": spread} if spread else {}) | {
        "name": INGRESS_DEPLOYMENT,
        "num_replicas": config.ingress.num_replicas,
        "ray_actor_options": _placed(config.ingress.node_type_resource),
        "max_ongoing_requests": 1000,
        "health_check_period_s": INGRESS_HEARTBEAT_S,  # also its heartbeat to admission
        # In-flight streams end, then __del__ commits this replica's usage.
        "graceful_shutdown_timeout_s": DRAIN_TIMEOUT_S + 20,
    }


def build_front_door_from_config(
    config: TieredConfig, tenant: str, main_app: str = MAIN_APP
) -> serve.Application:
    """Tenant `tenant`'s own ingress replicas, on its node type, calling the model servers
    of the main application `main_app` (deployments.api.front_door)."""
    door = next((d for d in front_door_plan(config) if d.tenant == tenant), None)
    if door is None:
        raise ConfigError(f"tenant {tenant!r} has no dedicated.front_door")
    options = _ingress_options(config) | {
        "num_replicas": door.num_replicas,
        "ray_actor_options": _placed(door.node_type_resource),
    }
    ingress = serve.deployment(Ingress).options(**options)  # type: ignore[attr-defined]
    return ingress.bind(config.model_dump(), {}, None, tenant, main_app)


def serve_apps(config: TieredConfig, main_app: str = MAIN_APP) -> list[ServeApp]:
    """The main application at /, then each front door at its prefix: deploy in order."""
    apps = [ServeApp(main_app, "/", build_from_config(config))]
    for door in front_door_plan(config):
        app = build_front_door_from_config(config, door.tenant, main_app)
        apps.append(ServeApp(door.app_name(main_app), door.route_prefix, app, door.tenant))
    return apps


def build(args: dict[str, Any]) -> serve.Application:
    """Serve's application-builder entry point. args: {"config": path to the Tiered YAML},
    or {"tiered": the Tiered config itself} (what `tiered config render` and the Helm
    chart emit, so the YAML need not be on the cluster's nodes).

    It runs where `serve deploy` runs it (a cluster's head), which has no weights: it
    never opens a checkpoint. Each replica checks its checkpoint once on its node."""
    return build_from_config(_config_arg(args))


def build_front_door(args: dict[str, Any]) -> serve.Application:
    """Serve's entry point for a tenant's front door: the same args as `build`, plus
    {"tenant": its name, "main_app": the main application's name (default tiered)}."""
    return build_front_door_from_config(
        _config_arg(args), args["tenant"], args.get("main_app", MAIN_APP)
    )


def _config_arg(args: dict[str, Any]) -> TieredConfig:
    if "tiered" in args:
        return parse_config(args["tiered"], "args.tiered", checkpoints=False)
    return load_config(args.get("config"), checkpoints=False)
