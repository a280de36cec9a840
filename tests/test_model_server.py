"""Model-server replicas through Serve handles on a real local Ray: concurrent streams on
two replicas, cancellation freeing KV blocks, the stats Serve's hooks read, LoRA adapters
(passed to the engine, reported for routing, a bad one failing typed), graceful drain and
release of the placement group, and bad configuration refused before anything is
scheduled. (Cross-node TP and rank failure: test_cross_node_tp.py.)"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import ray
from ray import serve
from ray.exceptions import ActorDiedError
from ray.util import placement_group_table

from deployments.api.errors import from_engine_error
from deployments.config.models import ConfigError, ModelSpec, ReplicaSpec
from deployments.replicas.affinity_router import adapter_stat
from deployments.replicas.model_server import WORKER_NAMESPACE, model_server_deployment
from models.errors import LoRALoadError
from models.lora import LoRARequest
from tests.lora_adapters import write_adapter
from tests.ray_fixtures import (
    GREEDY,
    LONG,
    collect,
    deploy,
    in_process_greedy,
    request,
    run,
    wait_idle,
)

HOOK_KEYS = {"num_running", "num_waiting", "kv_usage", "prefix_hit_rate", "max_num_seqs"}


@pytest.fixture(scope="module")
def pair(ray_cluster, tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    """One deployment, two TP=1 replicas."""
    handle = deploy(tiny_model_dir, "pair", num_replicas=2)
    yield handle
    serve.delete("pair")


def _replica_actors(handle, count: int, timeout_s: float = 30) -> dict:  # type: ignore[no-untyped-def]
    """Serve's own actor of each of `count` replicas (replica id -> actor): the objects its
    router and metrics code call. Learnt while the replicas are idle: the router sends a
    `stats` call to the less loaded replica, so a busy one may not answer it for as long
    as it is busy."""
    deadline = time.monotonic() + timeout_s
    names: dict[str, str] = {}
    while len(names) < count:
        assert time.monotonic() < deadline, f"only replicas {sorted(names)} answered stats"
        stats = handle.stats.remote().result(timeout_s=30)
        names[stats["replica_id"]] = stats["replica_actor"]
        time.sleep(0.05)
    return {r: ray.get_actor(name, namespace="serve") for r, name in names.items()}


def test_two_replicas_serve_concurrent_streams(pair, tiny_model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    prompts = [[10 + i, 20 + i, 30 + i] * (i + 1) for i in range(8)]
    solo = in_process_greedy(tiny_model_dir, prompts, GREEDY["max_tokens"])

    async def together() -> list[tuple[list[int], set[str]]]:
        return await asyncio.gather(
            *(
                collect(pair, request(f"c{i}", p, **GREEDY))
                for i, p in enumerate(prompts)
            )
        )

    results = run(together())
    assert [tokens for tokens, _ in results] == solo
    assert len(set().union(*(r for _, r in results))) == 2, "both replicas took streams"


def test_cancel_frees_kv_blocks(pair) -> None:  # type: ignore[no-untyped-def]
    async def cancel_midway() -> str:
        stream = pair.options(stream=True).generate.remote(
            request("cancel-me", list(range(50, 150)), **LONG)
        )
        async for served in stream:
            stream.cancel()
            return served.replica_id
        raise AssertionError("no output before cancelling")

    replica_id = run(cancel_midway())
    assert wait_idle(pair, replica_id)["kv_blocks_used"] == 0


def test_serve_hooks_publish_engine_stats(pair) -> None:  # type: ignore[no-untyped-def]
    """Through Serve's replica actor (the path its request router takes): running and KV
    use while a stream is live, prefix hits after a repeated prompt."""
    actors = _replica_actors(pair, 2)
    prompt = list(range(300, 364))  # 4 full KV blocks: cacheable
    ids = [
        run(collect(pair, request(f"p{i}", prompt, **GREEDY)))[1].pop()
        for i in range(4)
    ]
    # four requests on two replicas: one replica served the prompt at least twice
    hit_rates = [ray.get(actors[r].record_routing_stats.remote()) for r in set(ids)]
    assert all(set(h) >= HOOK_KEYS for h in hit_rates)
    assert max(h["prefix_hit_rate"] for h in hit_rates) > 0

    async def busy() -> dict:
        stream = pair.options(stream=True).generate.remote(request("busy", [9] * 40, **LONG))
        async for served in stream:
            load = await actors[served.replica_id].record_routing_stats.remote()
            stream.cancel()
            return load
        raise AssertionError("no output")

    load = run(busy())
    assert load["num_running"] == 1 and load["kv_usage"] > 0 and load["max_num_seqs"] == 32


def test_lora_adapters_through_the_replica(pair, tiny_model_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A request runs on its adapter, and the replica that loaded it reports it for routing
    until it is unloaded. A bad adapter reaches the caller as LoRALoadError with its
    param, from load_lora and from a stream alike: what the ingress answers with a 400."""
    sql = LoRARequest("sql", 1, str(write_adapter(tiny_model_dir, tmp_path / "sql", seed=1)))
    actors = _replica_actors(pair, 2)
    prompt = [11, 22, 33, 44, 55]
    base, _ = run(collect(pair, request("plain", prompt, **GREEDY)))
    tuned, (holder,) = run(collect(pair, replace(request("tuned", prompt, **GREEDY), lora=sql)))
    assert tuned != base, "the adapter did not reach the engine"
    stats = ray.get(actors[holder].record_routing_stats.remote(), timeout=30)
    assert stats[adapter_stat("sql@1")] == 1.0 and set(stats) >= HOOK_KEYS

    missing = LoRARequest("missing", 1, str(tmp_path / "no-such-adapter"))
    with pytest.raises(LoRALoadError) as raised:
        pair.load_lora.remote(missing).result(timeout_s=60)
    assert raised.value.param == "lora_path"
    answer = from_engine_error(raised.value)
    assert answer is not None and (answer.status, answer.param) == (400, "lora_path")
    with pytest.raises(LoRALoadError):
        run(collect(pair, replace(request("bad", prompt, **GREEDY), lora=missing)))

    pair.load_lora.remote(sql).result(timeout_s=60)  # a holder, so the unload has work
    unloaded = []
    deadline = time.monotonic() + 30
    while any(  # handle calls reach either replica: unload until neither holds it
        adapter_stat("sql@1") in ray.get(a.record_routing_stats.remote(), timeout=30)
        for a in actors.values()
    ):
        assert time.monotonic() < deadline, f"sql@1 still held; unload_lora said {unloaded}"
        unloaded.append(pair.unload_lora.remote("sql").result(timeout_s=30))
    assert True in unloaded


def test_a_tp2_replica_runs_adapters_like_tp1(pair, tiny_model_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Through a TP=2 replica (rank 1 a TPWorker actor), the followers load their slices of
    the adapter rank 0 validated: the same greedy tokens as the TP=1 pair, on the adapter
    and on the base in one batch."""
    sql = LoRARequest("sql-tp", 1, str(write_adapter(tiny_model_dir, tmp_path / "s", seed=7)))
    prompt = [11, 22, 33, 44, 55]
    tuned = replace(request("tuned", prompt, **GREEDY), lora=sql)
    want_tuned, _ = run(collect(pair, tuned))
    want_base, _ = run(collect(pair, request("base", prompt, **GREEDY)))
    handle = deploy(tiny_model_dir, "tp-lora", tp_size=2)
    try:

        async def both() -> list[tuple[list[int], set[str]]]:
            return await asyncio.gather(
                collect(handle, replace(tuned, request_id="tuned-tp2")),
                collect(handle, request("base-tp2", prompt, **GREEDY)),
            )

        (got_tuned, _), (got_base, _) = run(both())
        assert got_tuned == want_tuned != want_base
        assert got_base == want_base
        assert list(handle.stats.remote().result(timeout_s=30)["loras_resident"]) == ["sql-tp@1"]
    finally:
        serve.delete("tp-lora")


def test_graceful_drain_then_release(ray_cluster, tiny_model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """Deleting the deployment drains: a short stream in flight completes, a long one that
    outlives the drain timeout ends with an error (bounded), then the TP workers and the
    placement group are gone."""
    handle = deploy(tiny_model_dir, "drain", tp_size=2, drain_timeout_s=3.0)
    stats = handle.stats.remote().result(timeout_s=30)
    outcome: dict[str, object] = {}

    async def stream(name: str, max_tokens: int, started: asyncio.Event) -> None:
        params = {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
        tokens: list[int] = []
        try:
            async for served in handle.options(stream=True).generate.remote(
                request(name, [3, 4, 5], **params)
            ):
                tokens += [t for d in served.output.deltas for t in d.token_ids]
                started.set()
            outcome[name] = len(tokens)
        except ActorDiedError as exc:  # Serve killed the replica at the drain timeout
            outcome[name] = exc

    async def main() -> float:
        short_started, long_started = asyncio.Event(), asyncio.Event()
        tasks = [
            asyncio.create_task(stream("short", 20, short_started)),
            asyncio.create_task(stream("long", 1900, long_started)),
        ]
        await short_started.wait()
        await long_started.wait()
        deleting = threading.Thread(target=serve.delete, args=("drain",))
        began = time.monotonic()
        deleting.start()
        await asyncio.gather(*tasks)
        await asyncio.to_thread(deleting.join, 60)
        return time.monotonic() - began

    took = run(main(), timeout=90)
    assert outcome["short"] == 20, f"the short stream did not complete in the drain: {outcome}"
    assert isinstance(outcome["long"], ActorDiedError), f"the long stream was not ended: {outcome}"
    assert took < 30
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        states = [
            pg["state"]
            for pg in placement_group_table().values()
            if pg["name"] == stats["replica_actor"]
        ]
        if states == ["REMOVED"] and not any(map(_worker_alive, stats["worker_names"])):
            return
        time.sleep(0.2)
    raise AssertionError(f"placement group {states} or TP workers outlived the replica")


def _worker_alive(name: str) -> bool:
    try:
        ray.get_actor(name, namespace=WORKER_NAMESPACE)
    except ValueError:
        return False
    return True


def test_bad_configuration_refused_before_scheduling(ray_cluster, tiny_model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    from deployments.replicas.model_server import cluster_nodes

    groups = len(placement_group_table())
    spec = ModelSpec(name="tiny", path="default:tiny")  # its shape is known without a file
    with pytest.raises(ConfigError, match=r"^bad\.tp_size: 3 does not divide num_attention_heads"):
        model_server_deployment(spec, ReplicaSpec(tp_size=3), "bad")
    with pytest.raises(ConfigError, match=r"^bad\.placement_strategy: .*STRICT_SPREAD needs 4"):
        model_server_deployment(
            spec,
            ReplicaSpec(tp_size=4, placement_strategy="STRICT_SPREAD"),
            "bad",
            nodes=cluster_nodes(),
        )
    with pytest.raises(ConfigError, match=r"^bad\.node_type_resource: no node provides 'gpu_a100'"):
        model_server_deployment(
            spec, ReplicaSpec(node_type_resource="gpu_a100"), "bad", nodes=cluster_nodes()
        )
    assert len(placement_group_table()) == groups
    assert "bad" not in serve.status().applications
