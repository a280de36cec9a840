"""A faithful two-node emulation on a small box: `tiered bench run SCENARIO --pinned`.

Two Ray nodes (`ray.cluster_utils.Cluster`), each confined to its own cores from birth:
the driver sets its CPU affinity before each node starts, and every process of the node
(raylet, workers, the node's Serve proxy, the replicas) inherits it.

- The shared node (the head): GCS, the Serve controller, the shared pool, the shared
  front door (main ingress replicas, the shared admission shard, the fine-tuning runner)
  and its proxy on the usual port.
- The dedicated node: each dedicated tenant's private replicas, its own front door (an
  ingress application of its own, `front_door`) and admission shard, and a proxy on
  another port (`RAY_SERVE_WORKER_PROXY_HTTP_PORT`), which routes to same-node replicas.

The clients follow: each dedicated tenant's on the dedicated node's cores, talking to its
door; every other tenant's on the shared node's cores (bench.split_clients).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from rich.console import Console

from bench.scenario import Scenario, ScenarioError
from bench.split_clients import ClientGroup

if TYPE_CHECKING:
    from ray.cluster_utils import Cluster

    from deployments.config.tiered import TieredConfig

SHARED_NODE, DEDICATED_NODE = "node_shared", "node_dedicated"


@contextmanager
def _affinity(cpus: list[int]) -> Iterator[None]:
    """Processes started inside inherit `cpus`; the caller's own mask comes back after."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, set(cpus))
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def place_on_two_nodes(config: TieredConfig) -> list[str]:
    """Shared pools and the shared front door on the shared node, each dedicated tenant's
    copy and front door on the dedicated node; returns the dedicated tenants."""
    from deployments.config.tenants import FrontDoorSpec

    config.ingress.node_type_resource = SHARED_NODE
    for model in config.models:
        model.shared_pool.node_type_resource = SHARED_NODE
        model.shared_pool.cpu_affinity = None
    dedicated = []
    for tenant in config.tenants:
        if tenant.dedicated is None:
            continue
        tenant.dedicated.replica.node_type_resource = DEDICATED_NODE
        tenant.dedicated.replica.cpu_affinity = None
        if tenant.dedicated.front_door is None:
            tenant.dedicated.front_door = FrontDoorSpec()
        dedicated.append(tenant.name)
    if not dedicated:
        raise ScenarioError("--pinned needs a dedicated tenant in the Tiered config")
    return dedicated


def client_groups(
    scenario: Scenario, dedicated: list[str], cpus: tuple[list[int], list[int]]
) -> list[ClientGroup]:
    """The dedicated tenants' clients on the dedicated cores, the rest on the shared ones."""
    own = tuple(t for t in scenario.tenants if t in dedicated)
    rest = tuple(t for t in scenario.tenants if t not in dedicated)
    groups = [ClientGroup(own, tuple(cpus[0]))] if own else []
    return groups + ([ClientGroup(rest, tuple(cpus[1]))] if rest else [])


@contextmanager
def two_node_cluster(
    num_cpus: int, door_port: int, console: Console
) -> Iterator[tuple[Cluster, tuple[list[int], list[int]]]]:
    """The two pinned nodes; yields (cluster, (dedicated cpus, shared cpus))."""
    from ray.cluster_utils import Cluster  # at run time, not import time

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise ScenarioError("--pinned needs at least 2 CPUs")
    half = len(cpus) // 2
    dedicated_cpus, shared_cpus = cpus[:half], cpus[half:]
    per_node = max(1, num_cpus // 2)
    with console.status(
        f"starting 2 Ray nodes: shared on cores {shared_cpus}, dedicated on {dedicated_cpus}"
    ):
        with _affinity(shared_cpus):
            cluster = Cluster(
                initialize_head=True,
                head_node_args={
                    "num_cpus": per_node,
                    "resources": {SHARED_NODE: 100},
                    "include_dashboard": False,
                },
            )
        try:
            with _affinity(dedicated_cpus):
                cluster.add_node(
                    num_cpus=per_node,
                    resources={DEDICATED_NODE: 100},
                    env_vars={"RAY_SERVE_WORKER_PROXY_HTTP_PORT": str(door_port)},
                )
        except BaseException:
            cluster.shutdown()
            raise
    try:
        yield cluster, (dedicated_cpus, shared_cpus)
    finally:
        cluster.shutdown()
