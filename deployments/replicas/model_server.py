"""The model-server deployment: one Serve replica = one placement group = one TP group.

Rank 0 runs inside the replica actor (scheduler, sampling, the async engine); ranks
1..N-1 are `TPWorker` actors placed in the replica's other bundles. Health fails when any
rank is gone or the engine loop stalls, and Serve then replaces the replica, and with it
every rank: the workers are owned by the replica actor and sit in its placement group,
which Serve removes when it stops the replica. A replica whose engine died does not wait
for three failed health checks meanwhile taking new requests: once its open streams have
their error it exits, Serve's routers drop it, and the ingress sends again any request
that had no token yet.

Serve 2.60's gang scheduling (`GangSchedulingConfig`, RESTART_GANG) is not used: a gang is
N replicas that each take requests, while here only rank 0 takes requests and the other
ranks follow its steps. One replica owning one placement group gives the same
all-or-nothing restart without routing requests to followers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import asdict
from typing import Any, TypeVar

import ray
from ray import serve
from ray.actor import ActorHandle
from ray.exceptions import RayActorError
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from deployments.config.models import (
    ConfigError,
    ModelSpec,
    ReplicaSpec,
    validate_adapters,
    validate_against_checkpoint,
    validate_against_cluster,
    validate_without_checkpoint,
)
from deployments.config.plan import ADMISSION_NAMESPACE, admission_actor_name
from deployments.config.resources import replica_bundles
from deployments.observability.replicas import ReplicaExporter
from deployments.replicas.affinity_router import adapter_stat, affinity_router_config
from deployments.replicas.caller_watch import CallerWatch
from deployments.replicas.placement import replica_actor_options, worker_actor_options
from deployments.replicas.requests import GenerateRequest, ServedOutput
from deployments.replicas.tp_worker import TPWorker, rendezvous_address
from deployments.replicas.usage_backup import UsageBackup
from deployments.tenancy.types import UsageStatus
from models.async_engine import AsyncLLMEngine
from models.default_model import resolve_model_path
from models.errors import EngineDeadError
from models.lora import LoRARequest
from models.outputs import EngineStats, RequestOutput
from models.tokenizer import tokenizer_files
from models.tp import ParallelContext, init_parallel

log = logging.getLogger(__name__)
WORKER_PING_TIMEOUT_S = 5.0
HEARTBEAT_TIMEOUT_S = 2.0
RETIRE_DEADLINE_S = 10.0  # a replica whose engine died exits within this long
RETIRE_GRACE_S = 0.3  # after its last stream was failed, so the error goes out first
WORKER_NAMESPACE = "tiered-tp"
T = TypeVar("T")


class ModelServer:
    """A Serve replica wrapping AsyncLLMEngine over a TP group."""

    async def __init__(  # type: ignore[misc]  # Serve awaits an async __init__
        self,
        model: dict,
        replica: dict,
        pool: str = "shared",
        report: bool = False,
        fields: tuple[str, str] = ("replica", "model"),
        shard: str | None = None,
    ) -> None:
        started = time.monotonic()
        # Report seats to the app's admission actor (not when deployed alone in tests),
        # or to the shard of the tenant whose private copy this is.
        self.report_to = serve.get_replica_context().app_name if report else None
        self.shard = shard
        self._admission: ActorHandle | None = None
        self._queue_signals: dict[str, float] = {}
        self.usage_backup = UsageBackup()
        self.callers = CallerWatch()
        self.actor_id = ray.get_runtime_context().get_actor_id() or ""
        self.actor = ray.get_runtime_context().current_actor  # admission pings it
        self._retiring = False
        self._exiting: asyncio.Task | None = None
        self.spec = ModelSpec.model_validate(model)
        self.replica = ReplicaSpec.model_validate(replica)
        self.pool = pool
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.replica_actor = serve.get_replica_context().replica_id.to_full_id_str()
        model_dir = local_checkpoint(self.spec, self.replica, *fields)
        self.model_dir = model_dir
        self.workers: list[Any] = []
        self._runs: list[ray.ObjectRef] = []
        parallel = await self._start_ranks()
        config0 = self.spec.engine_config(self.replica, 0, model_dir)
        self.engine = await self._unless_a_rank_fails(
            asyncio.to_thread(AsyncLLMEngine, config0, parallel, self.replica.stall_timeout_s),
            "loading the model",
        )
        self.cold_start_s = time.monotonic() - started
        self.exporter = ReplicaExporter(pool, self.replica_id)
        log.info(
            "replica of %s (tp=%d) ready in %.1fs",
            self.spec.name,
            self.replica.tp_size,
            self.cold_start_s,
        )

    def tokenizer_files(self) -> dict[str, bytes]:
        """The checkpoint's tokenizer files (never its weights), for the ingress, which
        runs where the weights are not."""
        return tokenizer_files(self.model_dir)

    async def _start_ranks(self) -> ParallelContext | None:
        """Start ranks 1..N-1 in this replica's bundles 1..N-1, then join their group."""
        tp = self.replica.tp_size
        if tp == 1:
            return None
        bundles = replica_bundles(self.spec, self.replica)
        pg = get_current_placement_group()
        address = rendezvous_address()  # on rank 0's node, so cross-node ranks dial in
        assert pg is not None, "a TP replica runs in its placement group"
        for rank in range(1, tp):
            worker = TPWorker.options(  # type: ignore[attr-defined]  # a Ray actor class
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    pg, placement_group_bundle_index=rank
                ),
                name=f"{self.replica_id}-rank{rank}",
                namespace=WORKER_NAMESPACE,
                **worker_actor_options(bundles[rank]),
            ).remote(rank)
            # Each rank resolves the checkpoint on its own node (cross-node TP).
            config = self.spec.engine_config(self.replica, rank, self.spec.path)
            self._runs.append(worker.run.remote(config, tp, address))
            self.workers.append(worker)
        engine = self.spec.engine
        return await self._unless_a_rank_fails(
            asyncio.to_thread(
                init_parallel, 0, tp, address, engine.device, engine.collective_timeout_s
            ),
            "joining the process group",
        )

    async def _unless_a_rank_fails(self, work: Awaitable[T], what: str) -> T:
        """Await rank 0's part of startup, but fail at once (with the rank's own error)
        if a worker rank exits first, instead of waiting out the rendezvous timeout."""
        task = asyncio.ensure_future(work)
        if not self._runs:
            return await task
        runs = [asyncio.wrap_future(ref.future()) for ref in self._runs]
        try:
            await asyncio.wait([task, *runs], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in runs:
                fut.cancel()
        if task.done():
            return task.result()
        failed = next(fut for fut in runs if fut.done() and not fut.cancelled())
        cause = failed.exception()
        raise EngineDeadError(
            f"tensor-parallel rank {runs.index(failed) + 1} exited while {what}: {cause!r}"
        ) from cause

    async def generate(self, request: GenerateRequest) -> AsyncIterator[ServedOutput]:
        """Stream the engine's outputs for one admitted request; however it ends, what it
        produced goes to admission with the next heartbeat (billed only if the ingress
        that asked died before finishing the request). The stream stops, as for a client
        that left, if that ingress dies (CallerWatch)."""
        last: RequestOutput | None = None
        status: UsageStatus = "client_disconnect"
        try:
            with self.callers.watching(request.caller):
                async for out in self.engine.generate(
                    request.request_id,
                    request.prompt,
                    request.params,
                    priority=request.priority,
                    cache_salt=request.cache_salt,
                    retain=request.retain,
                    lora=request.lora,
                ):
                    last = out
                    yield ServedOutput(out, self.replica_id)
            status = "ok"
        except EngineDeadError:
            status = "error"
            self._retire()
            raise
        finally:
            self.usage_backup.produced(request, last, status)

    async def load_lora(self, lora: LoRARequest) -> float:
        """Load an adapter before its first request needs it (a no-op when held); the
        seconds it took. A bad adapter raises LoRALoadError, which reaches the caller as
        that type and with its `param` (Ray's dual exception), as the engine's other
        InvalidRequestErrors do."""
        return await self.engine.load_lora(lora)

    async def unload_lora(self, name: str) -> bool:
        """Drop the adapter held under `name`; False when none was."""
        return await self.engine.unload_lora(name)

    async def _heartbeat(self) -> None:
        """Tell the admission actor this replica's seats; learn its pool's queue depth."""
        if self.report_to is None:
            return
        try:
            if self._admission is None:
                name = admission_actor_name(self.report_to, self.shard)
                self._admission = ray.get_actor(name, namespace=ADMISSION_NAMESPACE)
            served = self.usage_backup.pending()
            self._queue_signals = await asyncio.wait_for(
                self._admission.replica_heartbeat.remote(
                    self.pool, self.replica_id, self.spec.engine.max_num_seqs, None,
                    self.actor_id, served, self.actor,
                ),
                HEARTBEAT_TIMEOUT_S,
            )
            self.usage_backup.delivered(len(served))
        except (ValueError, RayActorError, TimeoutError):  # not made yet, or gone: retry
            self._admission = None

    async def check_health(self) -> None:
        """Fail when the engine loop died or stalled, or a rank exited or stops answering.

        A dead loop, a stall or an exited rank is final: the followers are killed at once,
        which breaks rank 0 out of any collective it is stuck in, so in-flight streams end
        with EngineDeadError now rather than when Serve's drain times out; then the replica
        exits (`_retire`)."""
        await self._heartbeat()
        self.exporter.export(self.engine.stats())
        try:
            self.engine.check_health()
            if self._runs:
                done, _ = ray.wait(self._runs, num_returns=len(self._runs), timeout=0)
                if done:
                    raise EngineDeadError(f"{len(done)} tensor-parallel rank(s) exited")
        except EngineDeadError:
            self._retire()
            raise
        pings = [w.ping.remote() for w in self.workers]
        try:
            await asyncio.wait_for(asyncio.gather(*pings), WORKER_PING_TIMEOUT_S)
        except Exception as exc:  # a slow answer may be load: Serve counts repeated failures
            self.exporter.up(False)
            raise EngineDeadError(f"a tensor-parallel rank is unreachable: {exc!r}") from exc
        self.exporter.up(True)

    @staticmethod
    def _load(s: EngineStats) -> dict[str, float]:
        return {
            "num_running": float(s.num_running),
            "num_waiting": float(s.num_waiting),
            "kv_usage": s.kv_usage,
            "prefix_hit_rate": s.prefix_hit_rate,
            "max_num_seqs": float(s.max_num_seqs),
            "tokens_per_s": s.tokens_per_s,
        }

    def record_routing_stats(self) -> dict[str, float]:
        """Load, plus one key per adapter held, so the router can prefer a holder (and the
        KV blocks held, which chaos runs read to see a replica back at idle)."""
        s = self.engine.stats()
        held = {"kv_blocks_used": float(s.kv_blocks_used)}
        return {**self._load(s), **held, **{adapter_stat(key): 1.0 for key in s.loras_resident}}

    def record_autoscaling_stats(self) -> dict[str, float]:
        return {**self._load(self.engine.stats()), **self._queue_signals}

    async def stats(self) -> dict[str, Any]:
        """Engine stats plus placement facts, for tests, benchmarks and `tiered status`."""
        node_ids = [ray.get_runtime_context().get_node_id()]
        node_ids += await asyncio.gather(*(w.node_id.remote() for w in self.workers))
        engine_stats = self.engine.stats()
        return {
            **asdict(engine_stats),
            "kv_usage": engine_stats.kv_usage,
            "prefix_hit_rate": engine_stats.prefix_hit_rate,
            "replica_id": self.replica_id,
            "replica_actor": self.replica_actor,
            "node_ids": node_ids,
            "cold_start_s": self.cold_start_s,
            "worker_names": [f"{self.replica_id}-rank{r}" for r in range(1, self.replica.tp_size)],
            "pool": self.pool,
        }

    async def __del__(self) -> None:
        """Serve's shutdown hook, run once Serve has drained in-flight requests within
        drain_timeout_s (none are routed here meanwhile): stop the engine, which releases
        the worker ranks, then kill them. Serve then removes the placement group. Past
        the timeout Serve kills the replica instead, and the streams still open end with
        an actor error."""
        engine = getattr(self, "engine", None)
        try:
            if engine is not None:
                engine.check_health()
        except EngineDeadError:
            self._kill_workers()  # a rank is gone or hung: free rank 0 from its collective
        if engine is not None:
            await engine.shutdown(0.0)
        self._kill_workers()

    def _retire(self) -> None:
        """The engine is dead for good: kill the followers at once (which frees rank 0
        from any collective, so open streams end with their error now), then, once those
        errors are on their way, this replica's own actor. Serve's routers drop a dead
        replica at once and the controller replaces it, where a live one with a dead
        engine would take new requests until three health checks had failed."""
        self.exporter.up(False)
        self._kill_workers()
        if not self._retiring:
            self._retiring = True
            if self._admission is not None:  # its seats go now, not at the heartbeat TTL
                self._admission.replica_lost.remote(self.pool, self.actor_id)
            self._exiting = asyncio.get_running_loop().create_task(self._exit())

    async def _exit(self) -> None:
        """Exit once every open stream has been failed (or RETIRE_DEADLINE_S passed),
        a moment later, so each stream's error reaches its caller before the actor goes."""
        deadline = time.monotonic() + RETIRE_DEADLINE_S
        while self.engine.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(RETIRE_GRACE_S)
        log.error("engine dead: this replica exits so that Serve replaces it")
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    def _kill_workers(self) -> None:
        for worker in getattr(self, "workers", []):
            ray.kill(worker, no_restart=True)


def local_checkpoint(spec: ModelSpec, replica: ReplicaSpec, where: str, model_where: str) -> str:
    """This node's copy of the checkpoint (a URI is fetched into the node's cache),
    checked against the replica's shape, and the model's local adapters; a ConfigError
    naming the field otherwise, which fails the replica and shows in the deployment's
    status."""
    node = ray.util.get_node_ip_address()
    try:
        model_dir = resolve_model_path(spec.path)
    except ValueError as exc:  # no such directory or URI, no config.json
        raise ConfigError(f"{where}.path: no checkpoint on node {node}: {exc}") from None
    validate_against_checkpoint(spec.model_copy(update={"path": str(model_dir)}), replica, where)
    validate_adapters(spec, model_where)
    return str(model_dir)


def cluster_nodes() -> list[dict[str, float]]:
    """Total resources of each live node, for `validate_against_cluster` (needs Ray up)."""
    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def model_server_deployment(
    spec: ModelSpec,
    replica: ReplicaSpec,
    name: str,
    pool: str = "shared",
    report: bool = False,
    nodes: list[dict[str, float]] | None = None,
    where: str | None = None,
    model_where: str = "model",
    shard: str | None = None,
) -> serve.Application:
    """A bound Serve deployment of TP replicas of `spec`, one placement group each.

    Validates first what needs no checkpoint (this may run on a head without weights),
    so bad configuration fails here and nothing is scheduled; against `nodes` (e.g.
    `cluster_nodes()`) when given. Leave `nodes` out where an autoscaler will add the
    nodes a replica needs. Each replica checks the checkpoint on its own node, naming
    `where` (the replica's config field, default `name`) and `model_where` (its model's).
    """
    where = where or name
    validate_without_checkpoint(spec, replica, where)
    if nodes is not None:
        validate_against_cluster(spec, nodes, replica, where)
    bundles = replica_bundles(spec, replica)
    scaling: dict = (
        {"autoscaling_config": replica.autoscaling.serve_config(pool)}
        if replica.autoscaling
        else {"num_replicas": replica.num_replicas}
    )
    deployment = serve.deployment(ModelServer).options(  # type: ignore[attr-defined]
        name=name,
        **scaling,
        max_ongoing_requests=replica.max_ongoing_requests,
        ray_actor_options=replica_actor_options(bundles[0]),
        placement_group_bundles=bundles,
        placement_group_strategy=replica.placement_strategy,
        health_check_period_s=replica.health_check_period_s,
        health_check_timeout_s=max(10.0, WORKER_PING_TIMEOUT_S * 2),
        # Continuations go back to the replica holding their prefix unless it is saturated,
        # read from record_routing_stats every second.
        request_router_config=affinity_router_config(),
        # Serve stops routing here, waits up to this long for in-flight requests, runs
        # __del__ if time is left, then kills the actor (its workers die with it: they are
        # its children, in its bundles) and removes the placement group.
        graceful_shutdown_timeout_s=replica.drain_timeout_s,
        graceful_shutdown_wait_loop_s=0.5,
    )
    return deployment.bind(
        spec.model_dump(), replica.model_dump(), pool, report, (where, model_where), shard
    )


model_server_app = model_server_deployment  # the name the app builder and benches use
