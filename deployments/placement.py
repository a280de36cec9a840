"""Placement-group bundles for one replica: one bundle per TP rank, and whether they fit.

Rank 0 is the Serve replica actor itself, so bundle 0 also carries the replica actor's CPU.
A node-type resource, when set, is asked for in every bundle, which pins the whole replica
to the nodes that provide it (e.g. the nodes a dedicated tenant bought). The fit check
mirrors what Ray's placement strategies promise, so a replica that can never be placed is
refused at load instead of pending forever.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from deployments.serving_config import ModelSpec, ReplicaSpec

NODE_TYPE_SHARE = 0.01
Resources = dict[str, float]


def rank_resources(spec: ModelSpec, replica: ReplicaSpec) -> Resources:
    """What one rank reserves: `bundle_resources`, else {GPU: 1} on CUDA or {CPU: 1}."""
    if replica.bundle_resources is not None:
        return dict(replica.bundle_resources)
    return {"GPU": 1.0} if spec.engine.device == "cuda" else {"CPU": 1.0}


def replica_bundles(spec: ModelSpec, replica: ReplicaSpec) -> list[Resources]:
    per_rank = rank_resources(spec, replica)
    if replica.node_type_resource:
        per_rank[replica.node_type_resource] = NODE_TYPE_SHARE
    bundles = [dict(per_rank) for _ in range(replica.tp_size)]
    if "CPU" not in bundles[0]:
        bundles[0]["CPU"] = 1.0  # the replica actor's own CPU (GPU bundles carry none)
    return bundles


def replica_actor_options(bundle0: Resources) -> dict:
    """The replica actor takes bundle 0's CPU and its GPU, if any."""
    options: dict = {"num_cpus": bundle0.get("CPU", 0.0)}
    if bundle0.get("GPU"):
        options["num_gpus"] = bundle0["GPU"]
    return options


def worker_actor_options(bundle: Resources) -> dict:
    """A TP worker takes its bundle's GPU, and its CPU when the bundle has one."""
    return {"num_cpus": bundle.get("CPU", 0.0), "num_gpus": bundle.get("GPU", 0.0)}


def fits(bundle: Resources, free: Resources) -> bool:
    return all(free.get(k, 0.0) >= v for k, v in bundle.items() if v > 0)


def _take(bundle: Resources, free: Resources) -> None:
    for k, v in bundle.items():
        free[k] = free.get(k, 0.0) - v


def pack_on_nodes(bundles: list[Resources], nodes: list[Resources], strategy: str) -> str | None:
    """None if `bundles` can be placed on `nodes` under `strategy`, else why not.

    First-fit over the nodes' total resources (largest bundle first): exact for identical
    bundles, which is what a TP replica asks for.
    """
    order = sorted(bundles, key=lambda b: -sum(b.values()))
    if strategy == "STRICT_PACK":
        need = _total(bundles)
        if any(fits(need, n) for n in nodes):
            return None
        return f"STRICT_PACK needs {_fmt(need)} on one node; no node has that much"
    free = [dict(n) for n in nodes]
    used: set[int] = set()
    for bundle in order:
        spread = strategy == "STRICT_SPREAD"
        slot = next(
            (i for i, n in enumerate(free) if fits(bundle, n) and not (spread and i in used)),
            None,
        )
        if slot is None:
            if spread:
                able = sum(fits(bundle, n) for n in nodes)
                return (
                    f"STRICT_SPREAD needs {len(bundles)} nodes that each hold {_fmt(bundle)}; "
                    f"the cluster has {able}"
                )
            need, have = _total(bundles), _total(nodes)
            short = {k: v for k, v in need.items() if have.get(k, 0.0) < v}
            if short:
                return f"a replica needs {_fmt(short)} in all; the cluster has {_fmt(have)}"
            return f"{len(bundles)} bundles of {_fmt(bundle)} do not fit the nodes' free shapes"
        _take(bundle, free[slot])
        used.add(slot)
    return None


def _total(items: list[Resources]) -> Resources:
    out: Resources = {}
    for item in items:
        for k, v in item.items():
            out[k] = out.get(k, 0.0) + v
    return out


def _fmt(resources: Resources) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"
