"""Node-level scaling: replicas that cannot be placed make Ray's autoscaler add nodes of
the right type, and shared-pool growth never lands on a tenant's reserved node type.

Runs on Ray's fake multi-node provider (real autoscaler, real raylets, on this machine),
with its own driver process, since one driver holds one cluster and the session's test
cluster stays up meanwhile.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.fake_autoscaling_cluster import FakeAutoscalingCluster

ROOT = Path(__file__).resolve().parent.parent
NODE_TYPES = {
    "shared_cpu": {"resources": {"CPU": 2, "node_shared": 1}, "min_workers": 0, "max_workers": 2},
    "dedicated_acme_cpu": {
        "resources": {"CPU": 2, "node_dedicated_acme": 1},
        "min_workers": 0,
        "max_workers": 1,
    },
}


def test_pending_replicas_bring_up_nodes_of_their_own_type(tiny_model_dir: Path) -> None:
    cluster = FakeAutoscalingCluster(NODE_TYPES)
    try:
        address = cluster.start()
        run = subprocess.run(
            [sys.executable, "-m", "tests.node_autoscaling_scenario", address, str(tiny_model_dir)],
            cwd=ROOT,
            env={**cluster.env, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=540,
        )
    finally:
        cluster.shutdown()
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    print(json.dumps(result, indent=1))  # the timings, for the benchmark notes

    assert result["initial_nodes"] == ["head"]
    # The first deployment brought up one node of each type, and each replica sits there.
    assert result["after_deploy_nodes"] == ["head", "node_dedicated_acme", "node_shared"]
    assert result["shared_placement_1"] == [["node_shared", "node_shared"]]
    assert result["dedicated_placement_1"] == [["node_dedicated_acme"]]
    # One more shared replica (a full node's worth): one more shared node, never the
    # tenant's node, and the dedicated replica stays where it was.
    assert result["after_scale_nodes"] == [
        "head", "node_dedicated_acme", "node_shared", "node_shared"
    ]  # fmt: skip
    assert result["shared_placement_2"] == [["node_shared"] * 2] * 2
    assert result["dedicated_placement_2"] == [["node_dedicated_acme"]]
    # Under contention (a shared replica pending for want of nodes), the tenant's replica
    # died: its reservation is back on its own node type, and the pending shared replica
    # did not take the freed capacity.
    assert result["dedicated_placement_3"] == [["node_dedicated_acme"]]
    assert result["shared_running_3"] == 2
    assert result["after_restore_nodes"] == result["after_scale_nodes"]
