"""The app builder: one Tiered YAML in, one Serve application out.

`serve run deployments.app:build config=cluster/serve-default.yaml` or `tiered serve`.
It deploys one shared-pool model server per model, one dedicated model server per
dedicated tenant (its private copy, pinned by its node-type resource when set), and the
ingress, which receives handles to all of them.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from deployments.config import TieredConfig, load_config
from deployments.ingress import Ingress
from deployments.model_server import model_server_app


def shared_deployment_name(model: str) -> str:
    return f"shared-{model}".replace("/", "-").replace(":", "-")


def dedicated_deployment_name(tenant: str) -> str:
    return f"dedicated-{tenant}"


def build_from_config(config: TieredConfig) -> serve.Application:
    shared = {
        m.name: model_server_app(m, m.shared_pool, shared_deployment_name(m.name), pool="shared")
        for m in config.models
        if m.shared_pool.num_replicas > 0  # a model may be served to dedicated tenants only
    }
    dedicated = {}
    for tenant in config.tenants:
        if tenant.dedicated is None:
            continue
        model = config.model(tenant.dedicated.model)
        assert model is not None
        replica = tenant.dedicated.replica.model_copy(
            update={"num_replicas": tenant.dedicated.reserved_replicas}
        )
        dedicated[tenant.name] = model_server_app(
            model, replica, dedicated_deployment_name(tenant.name), pool=f"dedicated:{tenant.name}"
        )
    ingress = serve.deployment(Ingress).options(
        name="ingress",
        num_replicas=config.ingress.num_replicas,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=1000,
    )
    return ingress.bind(config.model_dump(), shared, dedicated)


def build(args: dict[str, Any]) -> serve.Application:
    """Serve's application-builder entry point: args {"config": path to the Tiered YAML}."""
    return build_from_config(load_config(args.get("config")))
