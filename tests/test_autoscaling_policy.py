"""The LLM autoscaling policy on synthetic signals and on a synthetic Serve context."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from deployments.autoscaling import (
    PoolSignals,
    desired_replicas,
    llm_pool_policy,
)
from deployments.config.models import AutoscalingSpec

TARGETS = AutoscalingSpec().targets()


def _signals(**kw: float) -> PoolSignals:
    base = {"replicas": 2, "kv_usage": 0.0, "running": 0, "waiting": 0, "capacity": 32}
    return PoolSignals(**(base | kw))


def test_idle_pool_asks_for_zero_and_serve_clamps() -> None:
    assert desired_replicas(_signals(), TARGETS)[0] == 0


def test_kv_pressure_scales_up() -> None:
    n, reason = desired_replicas(_signals(kv_usage=0.9), TARGETS)
    assert n == 3 and reason.startswith("kv_usage")


def test_running_sequences_against_max_num_seqs() -> None:
    # 2 replicas of 16 seats, 30 running: 30/16 / 0.8 = 2.34 -> 3.
    n, reason = desired_replicas(_signals(running=30), TARGETS)
    assert n == 3 and reason.startswith("seq_usage")
    assert desired_replicas(_signals(running=10), TARGETS)[0] == 1  # room to shrink


def test_dispatcher_backlog_counts_like_engine_waiting() -> None:
    engine = desired_replicas(_signals(waiting=34), TARGETS)
    dispatcher = desired_replicas(_signals(queued=34), TARGETS)
    assert engine == dispatcher and engine[0] == 4 and engine[1].startswith("backlog")


def test_the_largest_signal_wins() -> None:
    n, reason = desired_replicas(_signals(kv_usage=0.5, running=31, waiting=80), TARGETS)
    assert n == 7 and reason.startswith("backlog")


def test_spec_bounds_and_serve_config() -> None:
    with pytest.raises(ValidationError, match="min_replicas=3 exceeds max_replicas=2"):
        AutoscalingSpec(min_replicas=3, max_replicas=2)
    cfg = AutoscalingSpec(min_replicas=1, max_replicas=4, upscale_delay_s=1).serve_config()
    assert cfg["policy"]["policy_function"] == "deployments.autoscaling:llm_pool_policy"
    from ray.serve.config import AutoscalingConfig

    parsed = AutoscalingConfig(**cfg)  # Serve accepts it as is
    assert parsed.max_replicas == 4 and parsed.upscale_delay_s == 1


def _context(
    metrics: dict, current: int, spec: AutoscalingSpec, state: dict | None = None, target=None
):  # type: ignore[no-untyped-def]
    """A real Serve AutoscalingContext, as the controller builds it, from synthetic stats."""
    from ray.serve._private.common import DeploymentID
    from ray.serve.config import AutoscalingConfig, AutoscalingContext

    config = AutoscalingConfig(**spec.serve_config(pool="m"))
    return AutoscalingContext(
        deployment_id=DeploymentID(name="shared-m", app_name="app"),
        deployment_name="shared-m",
        app_name="app",
        current_num_replicas=current,
        target_num_replicas=current if target is None else target,
        running_replicas=[],
        total_num_requests=0.0,
        total_queued_requests=0.0,
        aggregated_metrics=metrics,
        raw_metrics={},
        capacity_adjusted_min_replicas=spec.min_replicas,
        capacity_adjusted_max_replicas=spec.max_replicas,
        policy_state=state or {},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=None,
        config=config,
    )


BUSY = {
    "kv_usage": {"r1": 0.2, "r2": 0.3},
    "num_running": {"r1": 16, "r2": 15},
    "num_waiting": {"r1": 4, "r2": 6},
    "max_num_seqs": {"r1": 16, "r2": 16},
    "dispatcher_queue_depth": {"r1": 20, "r2": 20},
}


def test_policy_reads_replica_metrics_from_the_context() -> None:
    ctx = _context(BUSY, 2, AutoscalingSpec(max_replicas=8))
    wanted, state = llm_pool_policy(ctx)
    # backlog: 10 waiting + 20 queued - 2 allowed = 28 -> 2 + 28/16 = 3.75 -> 4
    assert wanted == 4
    assert state["last_decision"] == {"desired": 4, "actual": 2, "reason": "backlog=3.75"}


def test_policy_keeps_within_the_bounds() -> None:
    assert llm_pool_policy(_context(BUSY, 2, AutoscalingSpec(max_replicas=3)))[0] == 3
    idle = {"kv_usage": {"r1": 0.0}, "num_running": {"r1": 0}, "max_num_seqs": {"r1": 16}}
    spec = AutoscalingSpec(min_replicas=2, max_replicas=4)
    assert llm_pool_policy(_context(idle, 3, spec))[0] == 2


def test_queue_wait_target_asks_for_more_only_while_requests_queue() -> None:
    spec = AutoscalingSpec(max_replicas=8, target_queue_wait_s=1.0)
    waiting = {
        "num_running": {"r1": 2},
        "max_num_seqs": {"r1": 16},
        "dispatcher_queue_depth": {"r1": 1},
        "dispatcher_mean_wait_s": {"r1": 3.0},
    }
    wanted, state = llm_pool_policy(_context(waiting, 1, spec))
    assert wanted == 3 and state["last_decision"]["reason"] == "queue_wait=3.00"
    drained = {**waiting, "dispatcher_queue_depth": {"r1": 0}}
    assert llm_pool_policy(_context(drained, 1, spec))[0] == 1  # old waits alone do not count


class FakeClock:
    """Stands in for the `time` module Serve's delay logic reads (`time.time()`)."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


def test_serve_applies_the_upscale_and_downscale_delays_around_the_policy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Serve's own wrapper (the one its controller uses) holds a decision until the
    configured delay has passed, for each direction. Its clock is a fake one, so the
    steps land just before and at each delay whatever the load on the box."""
    from ray.serve import autoscaling_policy

    clock = FakeClock()
    monkeypatch.setattr(autoscaling_policy, "time", clock)
    policy = autoscaling_policy._apply_autoscaling_config(llm_pool_policy)
    spec = AutoscalingSpec(max_replicas=8, upscale_delay_s=3, downscale_delay_s=6)
    first, state = policy(_context(BUSY, 2, spec))
    assert first == 2, "scaled up before upscale_delay_s"
    clock.now += 2.9
    held, state = policy(_context(BUSY, 2, spec, state))
    assert held == 2, "scaled up before upscale_delay_s"
    clock.now += 0.1
    later, state = policy(_context(BUSY, 2, spec, state))
    assert later == 4, "no scale-up once upscale_delay_s had passed"

    idle = {"kv_usage": {"r1": 0.0}, "num_running": {"r1": 0}, "max_num_seqs": {"r1": 16}}
    down, state = policy(_context(idle, 4, spec, state))
    assert down == 4, "scaled down before downscale_delay_s"
    clock.now += 3.5
    down, state = policy(_context(idle, 4, spec, state))
    assert down == 4, "the downscale delay is longer than the upscale delay"
    clock.now += 2.4  # 5.9 s idle
    down, state = policy(_context(idle, 4, spec, state))
    assert down == 4, "scaled down before downscale_delay_s"
    clock.now += 0.1
    down, state = policy(_context(idle, 4, spec, state))
    assert down == 1, "no scale-down once downscale_delay_s had passed"


def running_replicas(app: str, deployment: str) -> int:
    from ray import serve

    status = serve.status().applications[app].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)


def one_model_config(model_dir, shared_pool: dict, dedicated: dict):  # type: ignore[no-untyped-def]
    """Model "m" on the tiny checkpoint (2 seats a replica), one dedicated tenant acme."""
    from deployments.config.tiered import TieredConfig

    acme = {"name": "acme", "tier": "dedicated", "api_key_hashes": [], "dedicated": dedicated}
    model = {
        "name": "m",
        "path": str(model_dir),
        "engine": {"num_kv_blocks": 128, "max_num_seqs": 2},
        "shared_pool": shared_pool,
    }
    return TieredConfig.model_validate(
        {"models": [model], "tenants": [acme], "ingress": {"num_replicas": 1}}
    )


def start_stream_load(handle, streams: int, tag: str):  # type: ignore[no-untyped-def]
    """`streams` long greedy streams through a deployment handle, on a thread of its own."""
    import asyncio
    import threading

    from tests.ray_fixtures import request

    async def one(i: int) -> None:
        stream = request(f"{tag}{i}", [5 + i % 3] * 18, max_tokens=300, ignore_eos=True)
        async for _ in handle.options(stream=True).generate.remote(stream):
            pass

    async def load() -> None:
        await asyncio.gather(*(one(i) for i in range(streams)))

    loader = threading.Thread(target=lambda: asyncio.run(load()))
    loader.start()
    return loader


def test_load_step_scales_up_and_idle_scales_back(ray_cluster, tiny_model_dir) -> None:
    """A real deployment with the policy: 8 long streams on 2-seat replicas -> 2 replicas;
    idle -> back to min. Bounded waits, short delays configured for the test."""
    import time

    from ray import serve

    from deployments.config.models import ModelSpec, ReplicaSpec
    from deployments.replicas.model_server import model_server_app

    spec = ModelSpec(
        name="auto", path=str(tiny_model_dir), engine={"num_kv_blocks": 128, "max_num_seqs": 2}
    )
    replica = ReplicaSpec(
        autoscaling={
            "min_replicas": 1,
            "max_replicas": 2,
            "upscale_delay_s": 1,
            "downscale_delay_s": 3,
            "metrics_interval_s": 0.5,
        }
    )
    handle = serve.run(model_server_app(spec, replica, "auto"), name="auto", route_prefix=None)

    def running() -> int:
        return running_replicas("auto", "auto")

    try:
        assert running() == 1
        loader = start_stream_load(handle, 8, "load")
        deadline = time.monotonic() + 60
        while running() < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert running() == 2, "no scale-up within 60 s of the load step"
        loader.join(timeout=120)
        deadline = time.monotonic() + 60
        while running() > 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert running() == 1, "no scale-down within 60 s of going idle"
    finally:
        serve.delete("auto")


def test_shared_scaling_stays_off_reserved_nodes_and_reservation_holds(
    ray_cluster, tiny_model_dir
) -> None:
    """Shared replicas are pinned to the head's node type, the dedicated tenant's copy to
    the worker's: a load step scales the shared pool on its own node type only, and the
    dedicated deployment stays at its reservation throughout."""
    import time

    import ray
    from ray import serve

    from deployments.app import build_from_config

    shared_pool = {
        "node_type_resource": "node_head",
        "autoscaling": {
            "min_replicas": 1,
            "max_replicas": 3,
            "upscale_delay_s": 1,
            "downscale_delay_s": 2,
            "metrics_interval_s": 0.5,
        },
    }
    dedicated = {
        "model": "m",
        "reserved_replicas": 1,
        "max_replicas": 1,
        "replica": {"node_type_resource": "node_worker"},
    }
    config = one_model_config(tiny_model_dir, shared_pool, dedicated)
    serve.run(build_from_config(config), name="pinned", route_prefix=None)
    shared = serve.get_deployment_handle("shared-m", app_name="pinned")
    dedicated = serve.get_deployment_handle("dedicated-acme", app_name="pinned")
    head = ray.get_runtime_context().get_node_id()  # the driver sits on the head node

    def replicas(name: str) -> int:
        return running_replicas("pinned", name)

    try:
        loader = start_stream_load(shared, 10, "p")
        deadline = time.monotonic() + 90
        peak = 1
        while time.monotonic() < deadline and peak < 2:
            peak = max(peak, replicas("shared-m"))
            assert replicas("dedicated-acme") == 1
            time.sleep(0.5)
        assert peak >= 2, "the shared pool did not scale up"
        nodes = {tuple(shared.stats.remote().result(timeout_s=30)["node_ids"]) for _ in range(12)}
        assert {n for ids in nodes for n in ids} == {head}
        ded_nodes = dedicated.stats.remote().result(timeout_s=30)["node_ids"]
        assert head not in ded_nodes
        loader.join(timeout=180)
        assert replicas("dedicated-acme") == 1
    finally:
        serve.delete("pinned")


def test_dedicated_tenant_bursts_and_comes_back_to_its_reservation(
    ray_cluster, tiny_model_dir
) -> None:
    """reserved_replicas=1, max_replicas=2: a load step on the tenant's own copy adds the
    burst replica, idle brings it back to the reservation, and it never goes below it."""
    import time

    from ray import serve

    from deployments.app import build_from_config

    scaling = {"upscale_delay_s": 1, "downscale_delay_s": 3, "metrics_interval_s": 0.5}
    dedicated = {
        "model": "m",
        "reserved_replicas": 1,
        "max_replicas": 2,
        "replica": {"autoscaling": scaling},
    }
    config = one_model_config(tiny_model_dir, {"num_replicas": 0}, dedicated)
    serve.run(build_from_config(config), name="burst", route_prefix=None)
    dedicated = serve.get_deployment_handle("dedicated-acme", app_name="burst")

    def running() -> int:
        return running_replicas("burst", "dedicated-acme")

    try:
        assert running() == 1
        loader = start_stream_load(dedicated, 8, "burst")
        seen: list[int] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not seen or seen[-1] < 2):
            seen.append(running())
            time.sleep(0.5)
        assert seen[-1] == 2, f"no burst replica within 60 s: {seen}"
        loader.join(timeout=120)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and seen[-1] > 1:
            seen.append(running())
            time.sleep(0.5)
        for _ in range(6):  # and it stays at the reservation, not below
            seen.append(running())
            time.sleep(0.5)
        assert seen[-1] == 1, f"not back to the reservation within 60 s: {seen}"
        assert min(seen) >= 1, seen
    finally:
        serve.delete("burst")
