"""Scaling a model-server deployment on LLM signals, through Serve's own policy hook.

Ongoing-request counts mislead for LLMs (a replica with 3 long generations can be full, one
with 30 short ones idle), so the policy reads what the engines publish through
`record_autoscaling_stats`: KV-cache use, waiting sequences, and running sequences against
`max_num_seqs`. Serve's wrapper then applies min/max bounds and the up/down delays.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from deployments.config.models import AutoscalingSpec
from deployments.observability import metrics

log = logging.getLogger(__name__)


@dataclass
class PoolSignals:
    """What the replicas reported, summed or averaged over the running replicas."""

    replicas: int
    kv_usage: float  # mean fraction of KV blocks in use
    running: float  # total running sequences
    waiting: float  # total waiting sequences (engine queues)
    capacity: float  # total max_num_seqs
    queued: float = 0.0  # requests waiting in the fair dispatcher for this pool
    queue_wait_s: float = 0.0  # recent mean wait for a seat in the fair dispatcher


def desired_replicas(signals: PoolSignals, targets: dict[str, float]) -> tuple[int, str]:
    """The replica count each signal asks for; the largest wins, with its reason.

    - kv_usage: replicas so that mean KV use sits at its target;
    - seq_usage: replicas so that running sequences fill `target_seq_usage` of max_num_seqs;
    - backlog: sequences waiting (in engines and in the fair dispatcher) beyond the allowed
      per-replica backlog, each `max_num_seqs` of them asking for one more replica;
    - queue_wait: while requests queue, replicas in proportion to the mean wait over
      its target.
    Idle asks for 0; Serve clamps to min_replicas.
    """
    n = max(signals.replicas, 1)
    per_replica = signals.capacity / n if signals.capacity else 1.0
    backlog = signals.waiting + signals.queued - targets["waiting_per_replica"] * n
    asks = {
        "kv_usage": n * signals.kv_usage / targets["kv_usage"],
        "seq_usage": (signals.running / per_replica) / targets["seq_usage"],
        "backlog": n + backlog / per_replica if backlog > 0 else 0.0,
        "queue_wait": (
            n * signals.queue_wait_s / targets.get("queue_wait_s", 2.0) if signals.queued else 0.0
        ),
    }
    reason, ask = max(asks.items(), key=lambda kv: kv[1])
    return math.ceil(ask - 1e-9), f"{reason}={ask:.2f}"


def signals_from_metrics(metrics: dict[str, dict[Any, float]], replicas: int) -> PoolSignals:
    def values(name: str) -> list[float]:
        return list((metrics.get(name) or {}).values())

    kv = values("kv_usage")
    return PoolSignals(
        replicas=replicas,
        kv_usage=sum(kv) / len(kv) if kv else 0.0,
        running=sum(values("num_running")),
        waiting=sum(values("num_waiting")),
        capacity=sum(values("max_num_seqs")),
        queued=max(values("dispatcher_queue_depth"), default=0.0),
        queue_wait_s=max(values("dispatcher_mean_wait_s"), default=0.0),
    )


def llm_pool_policy(ctx) -> tuple[int, dict[str, Any]]:
    """Serve policy entry point. It returns the ask within the (capacity-adjusted) bounds;
    Serve's wrapper applies the upscale and downscale delays around it."""
    kwargs = ctx.config.policy.policy_kwargs or {}
    targets = kwargs.get("targets") or AutoscalingSpec().targets()
    signals = signals_from_metrics(ctx.aggregated_metrics or {}, ctx.current_num_replicas)
    signals.queued += float(getattr(ctx, "total_queued_requests", 0) or 0)  # held at handles
    wanted, reason = desired_replicas(signals, targets)
    state = dict(ctx.policy_state or {})
    bounded = min(
        max(wanted, ctx.capacity_adjusted_min_replicas), ctx.capacity_adjusted_max_replicas
    )
    if bounded != ctx.current_num_replicas:
        log.info(
            "autoscale %s: %d -> %d (%s, bounds %d..%d)",
            ctx.deployment_name,
            ctx.current_num_replicas,
            bounded,
            reason,
            ctx.capacity_adjusted_min_replicas,
            ctx.capacity_adjusted_max_replicas,
        )
    pool = kwargs.get("pool") or ctx.deployment_name
    metrics.set_gauge("tiered_pool_replicas", bounded, pool=pool, kind="desired")
    state["last_decision"] = {
        "desired": bounded,
        "actual": ctx.current_num_replicas,
        "reason": reason,
    }
    return bounded, state
