"""KV-affinity routing: a conversation's next turn goes back to the replica that served the
previous one, whose prefix cache holds the conversation, unless it is gone or saturated.

Serve's PowerOfTwoChoices (FIFO order, node/AZ locality) routes every request without
affinity, and is the fallback rank for those with it. Saturation is the engine's own view,
from the replica's `record_routing_stats` (ModelServer reports num_running, num_waiting and
max_num_seqs): a replica with requests waiting for a seat, or every seat taken, would queue
the turn behind others, which costs more than recomputing the prefix elsewhere. Serve's
queue-length probe still applies on top: a replica at max_ongoing_requests takes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ray.serve._private.common import RequestMetadata
from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, RunningReplica

log = logging.getLogger(__name__)

HIT, MISS_GONE, MISS_SATURATED = "hit", "miss_gone", "miss_saturated"
ROUTING_STATS_PERIOD_S = 1.0  # saturation is at most about this stale
ROUTING_STATS_TIMEOUT_S = 2.0  # a reply later than two periods is stale: ask again


def affinity_of(pending_request: PendingRequest) -> str | None:
    """The replica id a request asks for (`GenerateRequest.affinity_replica`), if any."""
    for arg in (*pending_request.args, *pending_request.kwargs.values()):
        replica = getattr(arg, "affinity_replica", None)
        if isinstance(replica, str) and replica:
            return replica
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
    """PowerOfTwoChoices, with the affinity replica alone in the first rank when it can
    take the request. Affinity requests are handed exactly the replica chosen for them;
    FIFO hand-off (any chosen replica goes to the oldest request) applies to the rest."""

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
        wanted = affinity_of(pending_request) if pending_request is not None else None
        target = _find(candidate_replicas, wanted) if wanted else None
        ranks = await super().choose_replicas(candidate_replicas, pending_request)
        if target is None:
            return ranks
        if not is_saturated(target.routing_stats):
            return [[target], *ranks]
        # Saturated: prefer any other replica. Left alone in a locality stage (the only
        # replica on this node), skip that stage; left alone overall, it is the only one.
        assert pending_request is not None
        others = [[r for r in rank if r is not target] for rank in ranks]
        last_stage = pending_request.routing_context.should_backoff
        return [o or rank for o, rank in zip(others, ranks, strict=True) if o or last_stage]

    def _fulfill_next_pending_request(
        self,
        replica: RunningReplica,
        request_metadata: RequestMetadata | None = None,
    ) -> None:
        """Give `replica` to the request it was chosen for when that one has affinity;
        otherwise to the oldest pending request without affinity. Plain FIFO would hand a
        replica chosen for a continuation to whatever request is oldest, and a replica
        chosen for another request to the continuation."""
        own = self._own_request(request_metadata)
        if own is not None and affinity_of(own) is not None:
            self._assign(own, replica)
            return
        queue = self._pending_requests_to_fulfill
        while queue and queue[0].future.done():
            queue.popleft()
        for pr in queue:  # a request assigned mid-queue is dropped once it reaches the front
            if not pr.future.done() and affinity_of(pr) is None:
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


def _find(replicas: list[RunningReplica], unique_id: str | None) -> RunningReplica | None:
    return next((r for r in replicas if r.replica_id.unique_id == unique_id), None)


def affinity_router_config() -> RequestRouterConfig:
    """The model-server deployments' router, with routing stats fresh enough to see a
    replica saturate."""
    settings: dict[str, Any] = {  # Ray types **kwargs as dict values: pass them untyped
        "request_router_class": AffinityRouter,
        "request_routing_stats_period_s": ROUTING_STATS_PERIOD_S,
        "request_routing_stats_timeout_s": ROUTING_STATS_TIMEOUT_S,
    }
    return RequestRouterConfig(**settings)
