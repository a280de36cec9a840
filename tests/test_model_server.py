"""Model-server replicas on a real two-node Ray cluster: TP across nodes, streams,
cancellation, failure and replacement, and configuration errors before scheduling."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import ray
from pydantic import ValidationError
from ray import serve

from deployments.model_server import WORKER_NAMESPACE, model_server_app
from deployments.serving_config import (
    ConfigError,
    ModelSpec,
    ReplicaSpec,
    validate_against_checkpoint,
    validate_against_cluster,
)
from tests.serve_helpers import wait_until_replica_idle

GREEDY = {"max_tokens": 12, "temperature": 0.0, "ignore_eos": True}
PROMPTS = [[11, 22, 33, 44, 55], list(range(100, 160)), [7] * 20]


def _spec(path: Path, **replica: object) -> tuple[ModelSpec, ReplicaSpec]:
    spec = ModelSpec(name="tiny", path=str(path), engine={"num_kv_blocks": 128})
    return spec, ReplicaSpec(**replica)


async def _collect(handle, request: dict) -> tuple[list[int], set[str]]:
    tokens, replicas = [], set()
    async for served in handle.options(stream=True).generate.remote(request):
        replicas.add(served.replica_id)
        tokens += [t for d in served.output.deltas for t in d.token_ids]
    return tokens, replicas


def _run(coro, timeout: float = 120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="module")
def apps(ray_cluster, tiny_model_dir: Path):
    spec, tp1 = _spec(tiny_model_dir, num_replicas=2)
    _, tp2 = _spec(tiny_model_dir, tp_size=2, placement_strategy="STRICT_SPREAD")
    started = time.monotonic()
    h2 = serve.run(model_server_app(spec, tp2, "tp2"), name="tp2", route_prefix=None)
    h1 = serve.run(model_server_app(spec, tp1, "tp1"), name="tp1", route_prefix=None)
    yield {"tp1": h1, "tp2": h2, "deploy_s": time.monotonic() - started}
    serve.delete("tp1")
    serve.delete("tp2")


def test_cross_node_tp_matches_tp1(apps) -> None:
    stats = apps["tp2"].stats.remote().result(timeout_s=30)
    assert len(stats["node_ids"]) == 2 and len(set(stats["node_ids"])) == 2
    for i, prompt in enumerate(PROMPTS):
        req = {"request_id": f"x{i}", "prompt": prompt, "params": GREEDY}
        one, _ = _run(_collect(apps["tp1"], req))
        two, _ = _run(_collect(apps["tp2"], {**req, "request_id": f"y{i}"}))
        assert one == two and len(one) == 12


def test_two_replicas_serve_concurrent_streams(apps) -> None:
    handle = apps["tp1"]
    prompts = [[10 + i, 20 + i, 30 + i] * (i + 1) for i in range(8)]
    solo = [
        _run(_collect(handle, {"request_id": f"s{i}", "prompt": p, "params": GREEDY}))[0]
        for i, p in enumerate(prompts)
    ]

    async def together():
        return await asyncio.gather(
            *(
                _collect(handle, {"request_id": f"c{i}", "prompt": p, "params": GREEDY})
                for i, p in enumerate(prompts)
            )
        )

    results = _run(together())
    assert [r[0] for r in results] == solo
    assert len(set().union(*(r[1] for r in results))) == 2  # both replicas took streams


def test_cancel_frees_kv_blocks(apps) -> None:
    handle = apps["tp2"]

    async def cancel_midway() -> None:
        req = {
            "request_id": "cancel-me",
            "prompt": list(range(50, 150)),
            "params": {"max_tokens": 400, "temperature": 0.0, "ignore_eos": True},
        }
        stream = handle.options(stream=True).generate.remote(req)
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 3:
                break
        stream.cancel()

    _run(cancel_midway())
    wait_until_replica_idle(handle, "after cancel")


def test_killing_rank1_fails_streams_and_replica_is_replaced(apps) -> None:
    handle = apps["tp2"]
    before = handle.stats.remote().result(timeout_s=30)["replica_id"]

    async def stream_then_kill() -> str:
        req = {
            "request_id": "doomed",
            "prompt": [5] * 40,
            "params": {"max_tokens": 1000, "temperature": 0.0, "ignore_eos": True},
        }
        stream = handle.options(stream=True).generate.remote(req)
        seen = 0
        try:
            async for _ in stream:
                seen += 1
                if seen == 2:
                    await asyncio.to_thread(_kill_rank1, handle)
            return "finished"
        except Exception as exc:  # the terminal error we expect
            return type(exc).__name__

    outcome = _run(stream_then_kill(), timeout=60)
    assert outcome != "finished"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            tokens, replicas = _run(
                _collect(
                    handle,
                    {"request_id": f"after-{time.time()}", "prompt": [1, 2, 3], "params": GREEDY},
                ),
                30,
            )
            if before not in replicas and len(tokens) == 12:
                return
        except Exception:
            pass
        time.sleep(1)
    raise AssertionError("the replica was not replaced within 120 s")


def _kill_rank1(handle) -> None:
    (name,) = handle.stats.remote().result(timeout_s=30)["worker_names"]
    ray.kill(ray.get_actor(name, namespace=WORKER_NAMESPACE))


def test_bad_configuration_is_refused_before_scheduling(tiny_model_dir: Path) -> None:
    spec, replica = _spec(tiny_model_dir, tp_size=3)
    with pytest.raises(ConfigError, match=r"models\[0\]\.shared_pool\.tp_size: 3 does not divide"):
        validate_against_checkpoint(spec, replica, "models[0].shared_pool")
    with pytest.raises(ValidationError, match="dtype"):
        ModelSpec(name="m", engine={"dtype": "float8"})
    gpu = ModelSpec(name="g", engine={"device": "cuda"})
    nodes = [{"CPU": 8, "GPU": 4}, {"CPU": 8, "GPU": 4}]
    with pytest.raises(ConfigError, match="STRICT_PACK needs"):
        validate_against_cluster(
            gpu,
            ReplicaSpec(tp_size=8, placement_strategy="STRICT_PACK"),
            nodes,
            "models[0].shared_pool",
        )
    with pytest.raises(ConfigError, match="a rank needs 2 GPU but the largest node has 0"):
        validate_against_cluster(gpu, ReplicaSpec(bundle_resources={"GPU": 2}), [{"CPU": 8}], "m")
    with pytest.raises(ConfigError, match="no node provides 'acme_nodes'"):
        validate_against_cluster(gpu, ReplicaSpec(node_type_resource="acme_nodes"), nodes, "m")
    with pytest.raises(ValidationError, match="cpu_affinity has 1 CPU sets but tp_size is 2"):
        ReplicaSpec(tp_size=2, cpu_affinity=[[0]])
