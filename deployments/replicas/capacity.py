"""Can the cluster's node types hold every reservation? Checked before anything deploys.

Each dedicated tenant's `reserved_replicas` and each shared pool's minimum replicas are
placed, replica by replica (one placement group each), on `max_workers` nodes of the node
types that advertise the deployment's node-type resource. Deployments pinned to the same
resource compete for the same nodes.
"""

from __future__ import annotations

from collections import defaultdict

from deployments.config.plan import PoolPlan, deployment_plan
from deployments.config.resources import place, replica_bundles
from deployments.config.tiered import TieredConfig


def reservation_problems(config: TieredConfig) -> list[str]:
    """Why the node types cannot hold the reservations; empty when they can."""
    if not config.node_types:
        return []
    groups: dict[str | None, list[PoolPlan]] = defaultdict(list)
    for plan in deployment_plan(config):
        groups[plan.replica.node_type_resource].append(plan)
    problems = []
    for resource, deployments in groups.items():
        nodes = [
            dict(t.resources)
            for t in config.node_types.values()
            if resource is None or resource in t.resources
            for _ in range(t.max_workers)
        ]
        for plan in deployments:
            bundles, count = replica_bundles(plan.model, plan.replica), plan.floor
            strategy = plan.replica.placement_strategy
            placed = sum(place(bundles, nodes, strategy) for _ in range(count))
            if placed < count:
                kind = f"nodes with {resource!r}" if resource else "nodes"
                problems.append(
                    f"{plan.where}: {count} replica(s) of {len(bundles)} rank(s) reserved, but the "
                    f"{kind} (at max_workers) hold only {placed}"
                )
    return problems
