"""Placement-group bundles for one replica: one bundle per TP rank.

Rank 0 is the Serve replica actor itself, so bundle 0 also carries the replica actor's CPU.
A node-type resource, when set, is asked for in every bundle, which pins the whole replica
to the nodes that provide it (e.g. the nodes a dedicated tenant bought).
"""

from __future__ import annotations

from deployments.serving_config import ModelSpec, ReplicaSpec, rank_resources

NODE_TYPE_SHARE = 0.01


def replica_bundles(spec: ModelSpec, replica: ReplicaSpec) -> list[dict[str, float]]:
    per_rank = rank_resources(spec, replica)
    if replica.node_type_resource:
        per_rank[replica.node_type_resource] = NODE_TYPE_SHARE
    bundles = [dict(per_rank) for _ in range(replica.tp_size)]
    if "CPU" not in bundles[0]:
        bundles[0]["CPU"] = 1.0  # the replica actor's own CPU (GPU bundles carry none)
    return bundles


def replica_actor_options(bundle0: dict[str, float]) -> dict:
    """The replica actor takes bundle 0's CPU and its GPU, if any."""
    options: dict = {"num_cpus": bundle0.get("CPU", 0.0)}
    if bundle0.get("GPU"):
        options["num_gpus"] = bundle0["GPU"]
    return options


def worker_actor_options(bundle: dict[str, float]) -> dict:
    """A TP worker takes its bundle's GPU, and its CPU when the bundle has one."""
    return {"num_cpus": bundle.get("CPU", 0.0), "num_gpus": bundle.get("GPU", 0.0)}
