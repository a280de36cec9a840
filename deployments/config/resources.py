"""What a replica asks the cluster for, and whether that fits: pure functions of the config.

One bundle per TP rank. Rank 0 is the Serve replica actor itself, so bundle 0 also carries
the replica actor's CPU. A node-type resource, when set, is asked for in every bundle,
which pins the whole replica to the nodes that provide it (e.g. the nodes a dedicated
tenant bought). The fit check mirrors what Ray's placement strategies promise, so a
replica that can never be placed is refused at load instead of pending forever.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from deployments.config.models import ModelSpec, ReplicaSpec

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


def fits(bundle: Resources, free: Resources) -> bool:
    return all(free.get(k, 0.0) >= v for k, v in bundle.items() if v > 0)


def place(bundles: list[Resources], free: list[Resources], strategy: str) -> bool:
    """Take one replica's bundles from `free` (first fit, largest bundle first), or leave
    `free` untouched and return False. Exact for identical bundles, which is what a TP
    replica asks for."""
    if strategy == "STRICT_PACK":  # all ranks on one node: place their sum
        bundles = [_total(bundles)]
    trial = [dict(n) for n in free]
    used: set[int] = set()
    spread = strategy == "STRICT_SPREAD"
    for bundle in sorted(bundles, key=lambda b: -sum(b.values())):
        slot = next(
            (i for i, n in enumerate(trial) if fits(bundle, n) and not (spread and i in used)),
            None,
        )
        if slot is None:
            return False
        for k, v in bundle.items():
            trial[slot][k] = trial[slot].get(k, 0.0) - v
        used.add(slot)
    free[:] = trial
    return True


def pack_on_nodes(bundles: list[Resources], nodes: list[Resources], strategy: str) -> str | None:
    """None if `bundles` can be placed on `nodes` (their total resources) under
    `strategy`, else why not."""
    if place(bundles, [dict(n) for n in nodes], strategy):
        return None
    need = _total(bundles)
    if strategy == "STRICT_PACK":
        return f"STRICT_PACK needs {_fmt(need)} on one node; no node has that much"
    if strategy == "STRICT_SPREAD":
        able = sum(fits(bundles[0], n) for n in nodes)
        return (
            f"STRICT_SPREAD needs {len(bundles)} nodes that each hold {_fmt(bundles[0])}; "
            f"the cluster has {able}"
        )
    have = _total(nodes)
    short = {k: v for k, v in need.items() if have.get(k, 0.0) < v}
    if short:
        return f"a replica needs {_fmt(short)} in all; the cluster has {_fmt(have)}"
    return f"{len(bundles)} bundles of {_fmt(bundles[0])} do not fit the nodes' free shapes"


def _total(items: list[Resources]) -> Resources:
    out: Resources = {}
    for item in items:
        for k, v in item.items():
            out[k] = out.get(k, 0.0) + v
    return out


def _fmt(resources: Resources) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"
