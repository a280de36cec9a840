"""Tensor parallelism across two Ray nodes (ray.cluster_utils.Cluster): SPREAD puts the
ranks on different nodes and greedy output equals TP=1; a node-type resource pins a
replica; killing or freezing rank 1 ends the in-flight stream with an error (bounded
wait) and Serve replaces the whole replica."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import pytest
import ray
from ray import serve

from deployments.replicas.model_server import WORKER_NAMESPACE
from models.errors import EngineDeadError
from tests.ray_fixtures import (
    GREEDY,
    LONG,
    PROMPTS,
    collect,
    deploy,
    in_process_greedy,
    request,
    run,
    wait_idle,
)


@pytest.fixture(scope="module")
def tp2(ray_cluster, tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    handle = deploy(
        tiny_model_dir,
        "xtp2",
        tp_size=2,
        placement_strategy="SPREAD",
        stall_timeout_s=5.0,
        health_check_period_s=1.0,
        drain_timeout_s=30.0,  # so only the replica's own kill can end a stalled stream fast
    )
    yield handle
    serve.delete("xtp2")


def _node_with(resource: str) -> str:
    return next(n["NodeID"] for n in ray.nodes() if n["Alive"] and resource in n["Resources"])


def test_spread_puts_ranks_on_different_nodes(tp2) -> None:  # type: ignore[no-untyped-def]
    stats = tp2.stats.remote().result(timeout_s=30)
    assert len(stats["node_ids"]) == 2
    assert set(stats["node_ids"]) == {_node_with("node_head"), _node_with("node_worker")}


def test_cross_node_greedy_equals_tp1(tp2, tiny_model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    reference = in_process_greedy(tiny_model_dir, PROMPTS, GREEDY["max_tokens"])
    for i, prompt in enumerate(PROMPTS):
        tokens, _ = run(collect(tp2, request(f"x{i}", prompt, **GREEDY)))
        assert len(tokens) == GREEDY["max_tokens"]
        assert tokens == reference[i], f"prompt {i}: TP=2 across nodes differs from TP=1"


def test_cancel_frees_kv_blocks_tp2(tp2) -> None:  # type: ignore[no-untyped-def]
    async def cancel_midway() -> str:
        stream = tp2.options(stream=True).generate.remote(
            request("cancel-tp2", list(range(50, 150)), **LONG)
        )
        seen = 0
        async for served in stream:
            seen += 1
            if seen == 3:
                stream.cancel()
                return served.replica_id
        raise AssertionError("the stream ended before it was cancelled")

    replica_id = run(cancel_midway())
    stats = wait_idle(tp2, replica_id)
    assert stats["kv_blocks_used"] == 0 and stats["num_running"] == 0


def test_node_type_resource_pins_the_replica(ray_cluster, tiny_model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    handle = deploy(tiny_model_dir, "pinned", tp_size=2, node_type_resource="node_worker")
    try:
        stats = handle.stats.remote().result(timeout_s=30)
        assert stats["node_ids"] == [_node_with("node_worker")] * 2
    finally:
        serve.delete("pinned")


def test_killing_rank1_errors_streams_and_replaces_the_replica(tp2, tiny_model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """Runs last in this module: it breaks the replica on purpose."""
    before = tp2.stats.remote().result(timeout_s=30)
    (worker_name,) = before["worker_names"]

    async def stream_then_kill() -> tuple[BaseException | None, float]:
        doomed = request("doomed", [5] * 40, **LONG)
        seen, killed = 0, time.monotonic()
        try:
            async for _ in tp2.options(stream=True).generate.remote(doomed):
                seen += 1
                if seen == 2:
                    killed = time.monotonic()
                    ray.kill(ray.get_actor(worker_name, namespace=WORKER_NAMESPACE))
            return None, 0.0
        # Rank 0's collective breaks and its engine fails the stream with EngineDeadError
        # (Ray re-raises it as a RayTaskError that is also an EngineDeadError); anything
        # else (an actor error at the drain timeout, a bug in this test) propagates.
        except EngineDeadError as exc:
            return exc, time.monotonic() - killed

    error, after_kill_s = run(stream_then_kill(), timeout=60)
    assert error is not None, "the stream outlived its rank-1 worker"
    assert after_kill_s < 10

    _wait_for_replacement(tp2, before, tiny_model_dir)


def test_frozen_rank1_stalls_then_errors_and_is_replaced(tp2, tiny_model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """A hung rank (SIGSTOP: alive, but silent) leaves rank 0 blocked in a collective; the
    stall check fails health, the followers are killed, and the stream ends with an error."""
    before = _wait_for_healthy(tp2)
    (worker_name,) = before["worker_names"]
    worker = ray.get_actor(worker_name, namespace=WORKER_NAMESPACE)
    pid = ray.get(worker.pid.remote())

    async def stream_then_freeze() -> tuple[BaseException | None, float]:
        stalled = request("frozen", [6] * 40, **LONG)
        seen, frozen = 0, time.monotonic()
        try:
            async for _ in tp2.options(stream=True).generate.remote(stalled):
                seen += 1
                if seen == 2:
                    frozen = time.monotonic()
                    os.kill(pid, signal.SIGSTOP)
            return None, 0.0
        # The stall fails the health check, which kills the followers: rank 0 leaves the
        # collective and fails the stream with EngineDeadError, well before Serve's drain
        # timeout would end it with an actor error.
        except EngineDeadError as exc:
            return exc, time.monotonic() - frozen

    try:
        error, after_freeze_s = run(stream_then_freeze(), timeout=90)
    finally:
        with contextlib.suppress(ProcessLookupError):  # killed by the health check, as meant
            os.kill(pid, signal.SIGCONT)
    assert error is not None, "the stream outlived its frozen rank"
    assert after_freeze_s < 20, f"the stream took {after_freeze_s:.0f}s to fail"
    _wait_for_replacement(tp2, before, tiny_model_dir)


def _wait_for_healthy(handle, timeout_s: float = 120) -> dict:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            run(collect(handle, request(f"probe-{time.time()}", [1, 2], **GREEDY)), 30)
            return handle.stats.remote().result(timeout_s=30)
        except Exception as exc:  # any failure while the replica comes back: retry
            last = exc
            time.sleep(1)
    raise AssertionError(f"the deployment did not serve within {timeout_s}s; last: {last!r}")


def _wait_for_replacement(handle, before: dict, model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """A new replica (new rank 0 and new ranks) serves TP=1-equal output; the old is gone."""
    deadline = time.monotonic() + 120
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            probe = request(f"after-{time.time()}", PROMPTS[0], **GREEDY)
            tokens, replicas = run(collect(handle, probe), 30)
        except Exception as exc:  # any failure while the replica is replaced: retry
            last = exc
            time.sleep(1)
            continue
        if before["replica_id"] not in replicas:
            assert tokens == in_process_greedy(model_dir, PROMPTS[:1], 12)[0]
            stats = handle.stats.remote().result(timeout_s=30)
            assert len(set(stats["node_ids"])) == 2  # a whole new TP group, one rank per node
            assert stats["worker_names"] != before["worker_names"]
            with pytest.raises(ValueError):  # rank 0 (the old replica actor) is gone too
                ray.get_actor(before["replica_actor"], namespace="serve")
            return
        time.sleep(1)
    raise AssertionError(f"the replica was not replaced within 120 s; last error: {last!r}")
