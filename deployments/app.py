"""The app builder: one Tiered YAML in, one Serve application out.

`serve run deployments.app:build config=cluster/serve-default.yaml` or `tiered serve`.
It deploys one shared-pool model server per model, one dedicated model server per
dedicated tenant (its private copy, pinned by its node-type resource when set), and the
ingress, which receives handles to all of them.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from deployments.api.ingress import Ingress
from deployments.config.models import AutoscalingSpec, ReplicaSpec
from deployments.config.tenants import DedicatedSpec
from deployments.config.tiered import TieredConfig, load_config, parse_config
from deployments.replicas.model_server import model_server_app
from deployments.tenancy.admission import INGRESS_HEARTBEAT_S, admission_actor_name


def shared_deployment_name(model: str) -> str:
    return f"shared-{model}".replace("/", "-").replace(":", "-")


def dedicated_deployment_name(tenant: str) -> str:
    return f"dedicated-{tenant}"


def dedicated_replica(dedicated: DedicatedSpec) -> ReplicaSpec:
    """The reservation is the floor: fixed at reserved_replicas, or autoscaled between the
    reservation and max_replicas when the tenant bought burst room."""
    reserved, ceiling = (
        dedicated.reserved_replicas,
        dedicated.max_replicas or dedicated.reserved_replicas,
    )
    if ceiling == reserved:
        return dedicated.replica.model_copy(update={"num_replicas": reserved, "autoscaling": None})
    scaling = dedicated.replica.autoscaling or AutoscalingSpec()
    scaling = scaling.model_copy(update={"min_replicas": reserved, "max_replicas": ceiling})
    return dedicated.replica.model_copy(update={"autoscaling": scaling})


def build_from_config(config: TieredConfig) -> serve.Application:
    admission = admission_actor_name(config.model_dump())
    shared = {
        m.name: model_server_app(
            m, m.shared_pool, shared_deployment_name(m.name), pool=m.name, admission=admission
        )
        for m in config.models
        # a model may be served to dedicated tenants only
        if m.shared_pool.num_replicas > 0 or m.shared_pool.autoscaling
    }
    dedicated = {}
    for tenant in config.tenants:
        if tenant.dedicated is None:
            continue
        model = config.model(tenant.dedicated.model)
        assert model is not None
        dedicated[tenant.name] = model_server_app(
            model,
            dedicated_replica(tenant.dedicated),
            dedicated_deployment_name(tenant.name),
            pool=f"dedicated:{tenant.name}",
            admission=admission,
        )
    ingress = serve.deployment(Ingress).options(
        name="ingress",
        num_replicas=config.ingress.num_replicas,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=1000,
        health_check_period_s=INGRESS_HEARTBEAT_S,  # also its heartbeat to admission
    )
    return ingress.bind(config.model_dump(), shared, dedicated)


def build(args: dict[str, Any]) -> serve.Application:
    """Serve's application-builder entry point. args: {"config": path to the Tiered YAML},
    or {"tiered": the Tiered config itself} (what `tiered config render` and the Helm
    chart emit, so the YAML need not be on the cluster's nodes)."""
    if "tiered" in args:
        return build_from_config(parse_config(args["tiered"], "args.tiered"))
    return build_from_config(load_config(args.get("config")))
