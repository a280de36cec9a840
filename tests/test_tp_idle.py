"""An idle TP=2 replica stays up: rank 1 waits for rank 0's next step in a collective
that has the group's timeout, so rank 0 must keep the group alive while it has no work.
The timeout is shortened to 2 s here (the default is 120 s) so the test idles for a few
multiples of it in seconds; the code path is the deployed one."""

from __future__ import annotations

import time
from pathlib import Path

import ray
from ray import serve

from deployments.config.models import ModelSpec, ReplicaSpec
from deployments.replicas.model_server import WORKER_NAMESPACE, model_server_deployment
from tests.ray_fixtures import GREEDY, PROMPTS, collect, request, run

TIMEOUT_S = 2.0


def test_idle_tp2_replica_outlives_collective_timeout(ray_cluster, tiny_model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    spec = ModelSpec(
        name="tiny",
        path=str(tiny_model_dir),
        engine={"num_kv_blocks": 64, "collective_timeout_s": TIMEOUT_S},
    )
    replica = ReplicaSpec(tp_size=2, health_check_period_s=0.5)
    app = model_server_deployment(spec, replica, "idle")
    handle = serve.run(app, name="idle", route_prefix=None)
    try:
        before = handle.stats.remote().result(timeout_s=30)
        rank1 = ray.get_actor(before["worker_names"][0], namespace=WORKER_NAMESPACE)
        pid = ray.get(rank1.pid.remote(), timeout=10)
        time.sleep(4 * TIMEOUT_S)  # idle, several collective timeouts long
        after = handle.stats.remote().result(timeout_s=30)
        assert after["replica_id"] == before["replica_id"], "the idle replica was replaced"
        assert ray.get(rank1.pid.remote(), timeout=10) == pid
        tokens, replicas = run(collect(handle, request("after-idle", PROMPTS[0], **GREEDY)))
        assert len(tokens) == GREEDY["max_tokens"]
        assert replicas == {before["replica_id"]}
    finally:
        serve.delete("idle")
