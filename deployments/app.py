"""The app builder: one Tiered YAML in, one Serve application out.

`serve run deployments.app:build config=my.yaml` or `tiered serve` (whose default is
deployments/config/serve-default.yaml, shipped in the package).
It deploys every model server of the plan (a shared pool per model, a private copy per
dedicated tenant, pinned by its node-type resource when set), the fine-tuning runner, and
the ingress, which receives a handle to each model server, keyed by pool, and the runner's.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from deployments.api.ingress import DRAIN_TIMEOUT_S, Ingress
from deployments.config.plan import FINE_TUNING_DEPLOYMENT, INGRESS_DEPLOYMENT, deployment_plan
from deployments.config.tiered import TieredConfig, load_config, parse_config
from deployments.replicas.model_server import model_server_app
from deployments.tenancy.admission import INGRESS_HEARTBEAT_S
from deployments.training.runner import FineTuningRunner


def build_from_config(config: TieredConfig) -> serve.Application:
    names = [m.name for m in config.models]
    handles = {
        plan.key: model_server_app(
            plan.model, plan.replica, plan.deployment, pool=plan.key, report=True,
            where=plan.where, model_where=f"models[{names.index(plan.model.name)}]",
        )
        for plan in deployment_plan(config)
    }
    ingress = serve.deployment(Ingress).options(  # type: ignore[attr-defined]
        name=INGRESS_DEPLOYMENT,
        num_replicas=config.ingress.num_replicas,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=1000,
        health_check_period_s=INGRESS_HEARTBEAT_S,  # also its heartbeat to admission
        # In-flight streams end, then __del__ commits this replica's usage.
        graceful_shutdown_timeout_s=DRAIN_TIMEOUT_S + 20,
    )
    runner = serve.deployment(FineTuningRunner).options(  # type: ignore[attr-defined]
        name=FINE_TUNING_DEPLOYMENT,
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=100,
    )
    return ingress.bind(config.model_dump(), handles, runner.bind(config.model_dump()))


def build(args: dict[str, Any]) -> serve.Application:
    """Serve's application-builder entry point. args: {"config": path to the Tiered YAML},
    or {"tiered": the Tiered config itself} (what `tiered config render` and the Helm
    chart emit, so the YAML need not be on the cluster's nodes).

    It runs where `serve deploy` runs it (a cluster's head), which has no weights: it
    never opens a checkpoint. Each replica checks its checkpoint once on its node."""
    if "tiered" in args:
        return build_from_config(parse_config(args["tiered"], "args.tiered", checkpoints=False))
    return build_from_config(load_config(args.get("config"), checkpoints=False))
