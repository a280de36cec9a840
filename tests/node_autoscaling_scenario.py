"""Driver for the node-level autoscaling test, run in its own process (one Ray cluster per
driver): `python -m tests.node_autoscaling_scenario ADDRESS MODEL_DIR`.

It deploys a shared pool pinned to the `node_shared` node type and a dedicated tenant
pinned to `node_dedicated_acme`, on a cluster that starts with no worker nodes, then
raises the shared pool by one replica. It prints one JSON line with, per phase, where each
replica runs (node type) and how long the autoscaler took.
"""

from __future__ import annotations

import json
import sys
import time

SHARED, DEDICATED = "node_shared", "node_dedicated_acme"


def node_types() -> dict[str, str]:
    """node id -> the node-type resource it advertises ('head' for none)."""
    import ray

    out = {}
    for node in ray.nodes():
        if node["Alive"]:
            kinds = [r for r in (SHARED, DEDICATED) if r in node["Resources"]]
            out[node["NodeID"]] = kinds[0] if kinds else "head"
    return out


def wait_running(app: str, names: list[str], replicas: dict[str, int], timeout_s: float) -> float:
    from ray import serve

    started = time.monotonic()
    deadline = started + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app)
        if status is not None:
            counts = {
                n: status.deployments[n].replica_states.get("RUNNING", 0)
                for n in names
                if n in status.deployments
            }
            if all(counts.get(n, 0) >= replicas[n] for n in names):
                return time.monotonic() - started
        time.sleep(0.5)
    raise TimeoutError(f"{app}: {replicas} not running within {timeout_s}s: {serve.status()}")


def placements(handle, replicas: int) -> list[list[str]]:  # type: ignore[no-untyped-def]
    """Node types of each replica's ranks (asks until every replica has answered)."""
    types = node_types()
    seen: dict[str, list[str]] = {}
    deadline = time.monotonic() + 60
    while len(seen) < replicas and time.monotonic() < deadline:
        stats = handle.stats.remote().result(timeout_s=30)
        seen[stats["replica_id"]] = [types.get(n, "gone") for n in stats["node_ids"]]
    return sorted(seen.values())


def main(address: str, model_dir: str) -> dict:
    import ray
    from ray import serve
    from ray.serve.api import RunTarget

    from deployments.config.models import ModelSpec, ReplicaSpec
    from deployments.replicas.model_server import model_server_app

    ray.init(address=address, log_to_driver=False)
    serve.start(http_options={"location": "NoServer"})
    spec = ModelSpec(name="m", path=model_dir, engine={"num_kv_blocks": 64, "max_num_seqs": 2})

    def shared(n: int):  # type: ignore[no-untyped-def]
        replica = ReplicaSpec(tp_size=2, num_replicas=n, node_type_resource=SHARED)
        return model_server_app(spec, replica, "shared-m", pool="m")

    dedicated = model_server_app(
        spec, ReplicaSpec(tp_size=1, node_type_resource=DEDICATED), "dedicated-acme"
    )
    def deploy(app, name: str) -> None:  # type: ignore[no-untyped-def]
        """Submit without waiting: the replicas wait for nodes the autoscaler adds."""
        target = RunTarget(app, name=name, route_prefix=None)
        serve.run_many([target], wait_for_applications_running=False)

    result: dict = {"initial_nodes": sorted(node_types().values())}
    deploy(shared(1), "shared")
    deploy(dedicated, "dedicated")
    result["first_replicas_s"] = max(
        wait_running("shared", ["shared-m"], {"shared-m": 1}, 240),
        wait_running("dedicated", ["dedicated-acme"], {"dedicated-acme": 1}, 240),
    )
    result["after_deploy_nodes"] = sorted(node_types().values())
    handle_shared = serve.get_deployment_handle("shared-m", app_name="shared")
    handle_dedicated = serve.get_deployment_handle("dedicated-acme", app_name="dedicated")
    result["shared_placement_1"] = placements(handle_shared, 1)
    result["dedicated_placement_1"] = placements(handle_dedicated, 1)

    started = time.monotonic()
    deploy(shared(2), "shared")
    wait_running("shared", ["shared-m"], {"shared-m": 2}, 240)
    result["second_shared_replica_s"] = time.monotonic() - started
    result["after_scale_nodes"] = sorted(node_types().values())
    result["shared_placement_2"] = placements(handle_shared, 2)
    result["dedicated_placement_2"] = placements(handle_dedicated, 1)

    # Contention: the shared pool asks for a third replica that no shared node is left
    # for, and the tenant's replica dies. Its capacity is not up for grabs: the pending
    # shared replica cannot take it, and the reservation comes back on its own node type.
    deploy(shared(3), "shared")
    time.sleep(3)
    victim = handle_dedicated.stats.remote().result(timeout_s=30)["replica_actor"]
    started = time.monotonic()
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    wait_not_running("dedicated", "dedicated-acme", 60)
    wait_running("dedicated", ["dedicated-acme"], {"dedicated-acme": 1}, 180)
    result["reservation_restored_s"] = time.monotonic() - started
    result["dedicated_placement_3"] = placements(handle_dedicated, 1)
    result["shared_running_3"] = running("shared", "shared-m")
    result["after_restore_nodes"] = sorted(node_types().values())
    serve.shutdown()
    return result


def running(app: str, name: str) -> int:
    from ray import serve

    return serve.status().applications[app].deployments[name].replica_states.get("RUNNING", 0)


def wait_not_running(app: str, name: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while running(app, name) and time.monotonic() < deadline:
        time.sleep(0.5)


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(sys.argv[1], sys.argv[2])), flush=True)
