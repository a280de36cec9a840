"""Which Serve replicas wait for capacity that training holds: the runner's reason to
yield (deployments.training.runner).

A replica waits when its actor is pending creation or its placement group (a TP
replica's bundles) is pending. It can use training's capacity only if it could be placed
on training's node type: it asks for that node-type resource, or for none at all. One
pinned to another node type (say, one that no node can ever fit) is no reason to stop
training: that would free nothing it could use, and would pause training for good.

The state API is asked at the cluster's own GCS address: left to find one itself, it
takes the newest Ray instance on the machine, which on a box shared by several clusters
may be another one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray.util.state import list_actors, list_placement_groups

SERVE_REPLICA_CLASS = "ServeReplica:"  # Serve's replica actors' class names
SERVE_REPLICA_NAME = "SERVE_REPLICA::"  # and their (placement groups') names
RAY_RESOURCES = frozenset({"CPU", "GPU", "memory", "object_store_memory"})
RAY_PREFIXES = ("node:", "accelerator_type:")
STATE_TIMEOUT_S = 10


def node_types(resources: Mapping[str, float]) -> frozenset[str]:
    """The custom resources among what a replica asks for: the node types it is pinned
    to (none: any node would do). Ray's own (CPU, GPU, memory, a node's id, an
    accelerator type, a placement group's share) name no node type."""
    return frozenset(
        r
        for r in resources
        if r not in RAY_RESOURCES and not r.startswith(RAY_PREFIXES) and "_group_" not in r
    )


def waiting_replicas(address: str) -> list[frozenset[str]]:
    """The node types each Serve replica waiting for resources now is pinned to: replica
    actors pending creation and placement groups (a replica's TP bundles) pending, from
    the state API of the cluster at GCS `address`. RayStateApiException if it does not
    answer."""
    ask: dict[str, Any] = {"address": address, "detail": True, "timeout": STATE_TIMEOUT_S}
    actors = list_actors(filters=[("state", "=", "PENDING_CREATION")], **ask)
    groups = list_placement_groups(filters=[("state", "=", "PENDING")], **ask)
    waiting = [
        node_types(a.required_resources or {})
        for a in actors
        if (a.class_name or "").startswith(SERVE_REPLICA_CLASS)
    ]
    for group in groups:
        if (group.name or "").startswith(SERVE_REPLICA_NAME):
            bundles = [node_types(b.get("unit_resources") or {}) for b in group.bundles or []]
            waiting.append(frozenset().union(*bundles))
    return waiting


def in_the_way(training_on: str | None, replica_on: frozenset[str]) -> bool:
    """Whether training pinned to `training_on` may hold capacity a replica waiting with
    these node types could take: it asks for that node type, or for none, or training is
    not pinned."""
    return training_on is None or not replica_on or training_on in replica_on
