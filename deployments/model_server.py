"""The model-server deployment: one Serve replica = one placement group = one TP group.

Rank 0 runs inside the replica actor (scheduler, sampling, the async engine); ranks
1..N-1 are `TPWorker` actors placed in the replica's other bundles. Health fails when any
rank is gone or the engine loop stalls, and Serve then replaces the replica, and with it
every rank, since the workers are owned by the replica actor.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import Any

import ray
from ray import serve
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from deployments.admission import ACTOR_NAMESPACE
from deployments.placement import replica_actor_options, replica_bundles, worker_actor_options
from deployments.serving_config import ModelSpec, ReplicaSpec
from deployments.tp_worker import TPWorker, rendezvous_address
from models.async_engine import AsyncLLMEngine
from models.default_model import resolve_model_path
from models.errors import EngineDeadError
from models.outputs import RequestOutput
from models.sampling_params import SamplingParams
from models.tp import init_parallel

log = logging.getLogger(__name__)
WORKER_PING_TIMEOUT_S = 5.0
HEARTBEAT_TIMEOUT_S = 2.0
WORKER_NAMESPACE = "tiered-tp"


@dataclass
class ServedOutput:
    """One engine step's output for a request, stamped with the replica that produced it."""

    output: RequestOutput
    replica_id: str


class ModelServer:
    """A Serve replica wrapping AsyncLLMEngine over a TP group."""

    async def __init__(
        self, model: dict, replica: dict, pool: str = "shared", admission: str | None = None
    ) -> None:
        started = time.monotonic()
        self.admission_name = admission
        self._admission = None
        self._queue_signals: dict[str, float] = {}
        self.spec = ModelSpec.model_validate(model)
        self.replica = ReplicaSpec.model_validate(replica)
        self.pool = pool
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        model_dir = str(resolve_model_path(self.spec.path))
        tp = self.replica.tp_size
        self.workers: list[Any] = []
        self._runs: list[ray.ObjectRef] = []
        parallel = None
        if tp > 1:
            bundles = replica_bundles(self.spec, self.replica)
            pg = get_current_placement_group()
            address = rendezvous_address()
            for rank in range(1, tp):
                worker = TPWorker.options(
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        pg, placement_group_bundle_index=rank
                    ),
                    name=f"{self.replica_id}-rank{rank}",
                    namespace=WORKER_NAMESPACE,
                    **worker_actor_options(bundles[rank]),
                ).remote(rank)
                config = self.spec.engine_config(self.replica, rank, model_dir)
                self._runs.append(worker.run.remote(config, tp, address))
                self.workers.append(worker)
            device = self.spec.engine.device
            parallel = await asyncio.to_thread(init_parallel, 0, tp, address, device)
        config0 = self.spec.engine_config(self.replica, 0, model_dir)
        self.engine = await asyncio.to_thread(
            AsyncLLMEngine, config0, parallel, self.replica.stall_timeout_s
        )
        self.cold_start_s = time.monotonic() - started
        log.info("replica of %s (tp=%d) ready in %.1fs", self.spec.name, tp, self.cold_start_s)

    async def generate(self, request: dict) -> AsyncIterator[ServedOutput]:
        """Stream outputs for {request_id, prompt, params, priority, cache_salt}."""
        params = SamplingParams(**request.get("params", {}))
        async for out in self.engine.generate(
            request["request_id"],
            request["prompt"],
            params,
            priority=int(request.get("priority", 0)),
            cache_salt=request.get("cache_salt"),
        ):
            yield ServedOutput(out, self.replica_id)

    async def _heartbeat(self) -> None:
        """Tell the admission actor this replica's seats; learn its pool's queue depth."""
        if not self.admission_name:
            return
        try:
            if self._admission is None:
                self._admission = ray.get_actor(self.admission_name, namespace=ACTOR_NAMESPACE)
            self._queue_signals = await asyncio.wait_for(
                self._admission.replica_heartbeat.remote(
                    self.pool, self.replica_id, self.spec.engine.max_num_seqs
                ),
                HEARTBEAT_TIMEOUT_S,
            )
        except Exception:  # no ingress has created it yet, or it restarted: try next time
            self._admission = None

    async def check_health(self) -> None:
        await self._heartbeat()
        self.engine.check_health()
        if not self._runs:
            return
        done, _ = ray.wait(self._runs, num_returns=len(self._runs), timeout=0)
        if done:
            raise EngineDeadError(f"{len(done)} tensor-parallel rank(s) exited")
        pings = [w.ping.remote() for w in self.workers]
        try:
            await asyncio.wait_for(asyncio.gather(*pings), WORKER_PING_TIMEOUT_S)
        except Exception as exc:
            raise EngineDeadError(f"a tensor-parallel rank is unreachable: {exc!r}") from exc

    def _load(self) -> dict[str, float]:
        s = self.engine.stats()
        return {
            "num_running": float(s.num_running),
            "num_waiting": float(s.num_waiting),
            "kv_usage": s.kv_usage,
            "prefix_hit_rate": s.prefix_hit_rate,
            "max_num_seqs": float(s.max_num_seqs),
            "tokens_per_s": s.tokens_per_s,
        }

    def record_routing_stats(self) -> dict[str, float]:
        return self._load()

    def record_autoscaling_stats(self) -> dict[str, float]:
        return {**self._load(), **self._queue_signals}

    async def stats(self) -> dict[str, Any]:
        """Engine stats plus placement facts, for tests, benchmarks and `tiered status`."""
        node_ids = [ray.get_runtime_context().get_node_id()]
        node_ids += await asyncio.gather(*(w.node_id.remote() for w in self.workers))
        return {
            **asdict(self.engine.stats()),
            "replica_id": self.replica_id,
            "node_ids": node_ids,
            "cold_start_s": self.cold_start_s,
            "worker_names": [f"{self.replica_id}-rank{r}" for r in range(1, self.replica.tp_size)],
            "pool": self.pool,
        }

    async def __del__(self) -> None:
        """Drain in-flight requests up to the configured timeout, then release the ranks."""
        engine = getattr(self, "engine", None)
        if engine is not None:
            await engine.shutdown(self.replica.drain_timeout_s)
        for worker in getattr(self, "workers", []):
            ray.kill(worker)


def model_server_app(
    spec: ModelSpec,
    replica: ReplicaSpec,
    name: str,
    pool: str = "shared",
    admission: str | None = None,
) -> serve.Application:
    """A bound Serve deployment of `replica.num_replicas` TP replicas of `spec`."""
    bundles = replica_bundles(spec, replica)
    scaling: dict = (
        {"autoscaling_config": replica.autoscaling.serve_config()}
        if replica.autoscaling
        else {"num_replicas": replica.num_replicas}
    )
    deployment = serve.deployment(ModelServer).options(
        name=name,
        **scaling,
        max_ongoing_requests=replica.max_ongoing_requests,
        ray_actor_options=replica_actor_options(bundles[0]),
        placement_group_bundles=bundles,
        placement_group_strategy=replica.placement_strategy,
        health_check_period_s=replica.health_check_period_s,
        health_check_timeout_s=max(10.0, WORKER_PING_TIMEOUT_S * 2),
        graceful_shutdown_timeout_s=replica.drain_timeout_s + 5,
    )
    return deployment.bind(spec.model_dump(), replica.model_dump(), pool, admission)
