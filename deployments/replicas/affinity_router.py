"""Request routing for model servers: KV affinity first, then LoRA adapter residency.

A conversation's next turn goes back to the replica that served the previous one, whose
prefix cache holds the conversation, unless it is gone or saturated. A request for a LoRA
adapter (`GenerateRequest.lora`) prefers a replica whose engine already holds that name and
version (ModelServer's routing stats carry `lora:<name>@<version>` per adapter held);
with none, the usual choice, and that replica loads it on demand, evicting its least
recently used adapter.

Serve's PowerOfTwoChoices (FIFO order, node/AZ locality) routes every request without
either preference, and is the fallback rank for those with one. Saturation is the engine's
own view, from the replica's `record_routing_stats` (ModelServer reports num_running,
num_waiting and max_num_seqs): a replica with requests waiting for a seat, or every seat
taken, would queue the request behind others, which costs more than recomputing a prefix
or loading an adapter elsewhere. Serve's queue-length probe still applies on top: a
replica at max_ongoing_requests takes nothing.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import Any

from ray.serve._private.common import RequestMetadata
from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, RunningReplica

from models.lora import LoRARequest

log = logging.getLogger(__name__)

HIT, MISS_GONE, MISS_SATURATED = "hit", "miss_gone", "miss_saturated"
ROUTING_STATS_PERIOD_S = 1.0  # saturation is at most about this stale
ROUTING_STATS_TIMEOUT_S = 2.0  # a reply later than two periods is stale: ask again
ADAPTER_STAT_PREFIX = "lora:"


def affinity_of(pending_request: PendingRequest) -> str | None:
    """The replica id a request asks for (`GenerateRequest.affinity_replica`), if any."""
    for arg in (*pending_request.args, *pending_request.kwargs.values()):
        replica = getattr(arg, "affinity_replica", None)
        if isinstance(replica, str) and replica:
            return replica
    return None


def adapter_stat(key: str) -> str:
    """The routing-stats key that says a replica holds adapter `key` (`name@version`)."""
    return f"{ADAPTER_STAT_PREFIX}{key}"


def adapter_of(pending_request: PendingRequest) -> str | None:
    """The routing-stats key of the adapter a request runs with (`GenerateRequest.lora`).
    Only a GenerateRequest's: `load_lora(lora)` must not be steered to a holder."""
    for arg in (*pending_request.args, *pending_request.kwargs.values()):
        lora = getattr(arg, "lora", None)
        if isinstance(lora, LoRARequest):
            return adapter_stat(lora.key)
    return None


def is_saturated(stats: Mapping[str, Any]) -> bool:
    """Requests wait for a seat, or every seat is taken; no stats yet means not saturated."""
    waiting = stats.get("num_waiting")
    running = stats.get("num_running")
    seats = stats.get("max_num_seqs")
    if waiting is not None and waiting > 0:
        return True
    return running is not None and seats is not None and seats > 0 and running >= seats


class AffinityRouter(PowerOfTwoChoicesRequestRouter):
    """PowerOfTwoChoices, after two preferred ranks: the affinity replica alone when it can
    take the request, then up to two non-saturated replicas holding the request's adapter
    (at random; Serve probes a rank's queue lengths and takes the shortest). A saturated
    preferred replica is left out of the fallback ranks too, unless it is the only one.

    Affinity goes first when both apply: the previous turn's replica is the only one whose
    prefix cache can hold the conversation (blocks are keyed by adapter name@version too),
    and losing it means a prefill of the whole history, while a replica without the adapter
    costs one adapter load. Usually they agree anyway: that replica loaded the adapter to
    serve the previous turn.

    Requests with either preference are handed exactly the replica chosen for them; FIFO
    hand-off (any chosen replica goes to the oldest request) applies to the rest."""

    _decisions: Any = None  # the tiered_affinity_routing_total counter, when metrics work

    def initialize_state(self, **kwargs: Any) -> None:
        super().initialize_state(**kwargs)
        try:
            from ray.util.metrics import Counter

            self._decisions = Counter(
                "tiered_affinity_routing_total",
                description="Continuations routed to their previous replica (hit), or not "
                "because it was gone (miss_gone) or saturated (miss_saturated).",
                tag_keys=("deployment", "outcome"),
            ).set_default_tags({"deployment": self._deployment_id.name})
        except Exception:  # metrics are optional: routing must not fail for them
            log.warning("tiered_affinity_routing_total is not available", exc_info=True)

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        ranks = await super().choose_replicas(candidate_replicas, pending_request)
        if pending_request is None:
            return ranks
        affinity = affinity_of(pending_request)
        target = _find(candidate_replicas, affinity) if affinity else None
        holders = _holding(candidate_replicas, adapter_of(pending_request))
        busy = [r for r in [target, *holders] if r is not None and _saturated(r)]
        preferred: list[list[RunningReplica]] = []
        if target is not None and target not in busy:
            preferred.append([target])
        if free := [r for r in holders if r not in busy]:
            preferred.append(random.sample(free, min(2, len(free))))
        last_stage = pending_request.routing_context.should_backoff
        return [*preferred, *_avoiding(busy, ranks, last_stage)]

    def _fulfill_next_pending_request(
        self,
        replica: RunningReplica,
        request_metadata: RequestMetadata | None = None,
    ) -> None:
        """Give `replica` to the request it was chosen for when that one has a preference
        (affinity or an adapter); otherwise to the oldest pending request without one.
        Plain FIFO would hand a replica chosen for a continuation or an adapter's holder
        to whatever request is oldest, and a replica chosen for another request to them."""
        own = self._own_request(request_metadata)
        if own is not None and _has_preference(own):
            self._assign(own, replica)
            return
        queue = self._pending_requests_to_fulfill
        while queue and queue[0].future.done():
            queue.popleft()
        for pr in queue:  # a request assigned mid-queue is dropped once it reaches the front
            if not pr.future.done() and not _has_preference(pr):
                self._assign(pr, replica)
                return

    def _own_request(self, metadata: RequestMetadata | None) -> PendingRequest | None:
        """The pending request this routing task works for (ids can be shared, metadata
        objects are not)."""
        if metadata is None:
            return None
        pr = self._pending_requests_by_id.get(metadata.internal_request_id)
        if pr is not None and pr.metadata is metadata and not pr.future.done():
            return pr
        for pr in self._pending_requests_to_fulfill:
            if pr.metadata is metadata and not pr.future.done():
                return pr
        return None

    def _assign(self, pr: PendingRequest, replica: RunningReplica) -> None:
        self._cancel_routing_task_for_pending_request(pr)
        self._record_queue_wait_time(pr)
        pr.future.set_result(replica)
        self._remove_pending_request_from_indices(pr)
        wanted = affinity_of(pr)
        if wanted is not None and self._decisions is not None:
            if replica.replica_id.unique_id == wanted:
                outcome = HIT
            elif _find(self._replicas_list, wanted) is None:
                outcome = MISS_GONE
            else:
                outcome = MISS_SATURATED
            self._decisions.inc(tags={"outcome": outcome})


def _has_preference(pr: PendingRequest) -> bool:
    return affinity_of(pr) is not None or adapter_of(pr) is not None


def _find(replicas: list[RunningReplica], unique_id: str | None) -> RunningReplica | None:
    return next((r for r in replicas if r.replica_id.unique_id == unique_id), None)


def _saturated(replica: RunningReplica) -> bool:
    return is_saturated(replica.routing_stats)


def _holding(replicas: list[RunningReplica], stat: str | None) -> list[RunningReplica]:
    """The replicas whose routing stats say they hold adapter `stat`."""
    return [r for r in replicas if stat is not None and stat in r.routing_stats]


def _avoiding(
    busy: list[RunningReplica], ranks: list[list[RunningReplica]], last_stage: bool
) -> list[list[RunningReplica]]:
    """`ranks` without the saturated replicas a request prefers: requests with that
    preference pile up there, so they spill to others (which recompute the prefix or load
    the adapter). A locality stage they alone fill (the only replicas on this node) is
    skipped; left alone in the last stage, they stay: they are the only replicas."""
    if not busy:
        return ranks
    others = [[r for r in rank if r not in busy] for rank in ranks]
    return [o or rank for o, rank in zip(others, ranks, strict=True) if o or last_stage]


def affinity_router_config() -> RequestRouterConfig:
    """The model-server deployments' router, with routing stats fresh enough to see a
    replica saturate."""
    settings: dict[str, Any] = {  # Ray types **kwargs as dict values: pass them untyped
        "request_router_class": AffinityRouter,
        "request_routing_stats_period_s": ROUTING_STATS_PERIOD_S,
        "request_routing_stats_timeout_s": ROUTING_STATS_TIMEOUT_S,
    }
    return RequestRouterConfig(**settings)
