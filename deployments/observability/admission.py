"""What the admission actor knows, as metrics: queues, reservations, replicas and cost.

The admission actor is the one process that sees every pool's fair queue, every
dedicated tenant's seats and every replica's heartbeat, so pool-level series come from
here once, never summed over ingress replicas. `export` runs about once a second.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from deployments.observability import metrics

if TYPE_CHECKING:
    from deployments.config.tiered import TieredConfig
    from deployments.tenancy.admission import AdmissionState

EXPORT_INTERVAL_S = 1.0


@dataclass(frozen=True)
class PoolFacts:
    """Static facts of a pool from the config: its tier, price and fixed replica count."""

    tier: str  # "shared" | "dedicated"
    price_per_replica_hour: float = 0.0
    fixed_replicas: int | None = None  # None when autoscaled: the policy exports desired


def pool_facts(config: TieredConfig) -> dict[str, PoolFacts]:
    """Each pool's facts, keyed like the heartbeats: `<model>` or `dedicated:<tenant>`."""
    facts = {}
    for m in config.models:
        pool = m.shared_pool
        if pool.num_replicas > 0 or pool.autoscaling:
            fixed = None if pool.autoscaling else pool.num_replicas
            facts[m.name] = PoolFacts("shared", pool.price_per_replica_hour, fixed)
    for t in config.tenants:
        if t.dedicated:
            ded = t.dedicated
            bursts = (ded.max_replicas or ded.reserved_replicas) > ded.reserved_replicas
            fixed = None if bursts else ded.reserved_replicas
            price = ded.replica.price_per_replica_hour
            facts[f"dedicated:{t.name}"] = PoolFacts("dedicated", price, fixed)
    return facts


class AdmissionExporter:
    def __init__(self, facts: dict[str, PoolFacts]) -> None:
        self.facts = facts
        self._bands_seen: dict[str, set[int]] = {}
        self._last = time.monotonic()

    def observe_wait(self, pool: str, band: int, waited_s: float) -> None:
        metrics.observe("tiered_queue_wait_seconds", waited_s, pool=pool, band=band)

    def export(self, state: AdmissionState, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        elapsed, self._last = max(0.0, now - self._last), now
        for pool, dispatcher in state.pools.items():
            depths = dispatcher.depth_by_band()
            seen = self._bands_seen.setdefault(pool, set()) | set(depths)
            self._bands_seen[pool] = seen
            for band in seen:  # a band that emptied reads 0, not its last depth
                metrics.set_gauge("tiered_queue_depth", depths.get(band, 0), pool=pool, band=band)
        for tenant, capacity in state.dedicated_capacity.items():
            used = state.dedicated_in_use.get(tenant, 0)
            utilization = min(1.0, used / capacity) if capacity else 0.0
            metrics.set_gauge("tiered_reservation_utilization", utilization, tenant=tenant)
        for pool, facts in self.facts.items():
            live = state.live_replicas(pool, now)
            metrics.set_gauge("tiered_pool_replicas", live, pool=pool, kind="actual")
            if facts.fixed_replicas is not None:
                metrics.set_gauge(
                    "tiered_pool_replicas", facts.fixed_replicas, pool=pool, kind="desired"
                )
            metrics.inc("tiered_replica_seconds_total", live * elapsed, pool=pool, tier=facts.tier)
            metrics.set_gauge(
                "tiered_replica_hour_price",
                facts.price_per_replica_hour,
                pool=pool,
                tier=facts.tier,
            )
