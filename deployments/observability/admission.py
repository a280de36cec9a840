"""What the admission actor knows, as metrics: queues, reservations, replicas and cost.

The admission actor is the one process that sees every pool's fair queue, every
dedicated tenant's seats and every replica's heartbeat, so pool-level series come from
here once, never summed over ingress replicas. `export` runs about once a second, on the
actor's snapshot.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from deployments.observability import metrics

if TYPE_CHECKING:
    from deployments.tenancy.types import AdmissionSnapshot, PoolSeats

EXPORT_INTERVAL_S = 1.0


class AdmissionExporter:
    def __init__(self, facts: dict[str, PoolSeats]) -> None:
        self.facts = facts
        self._bands_seen: dict[str, set[int]] = {}
        self._last = time.monotonic()

    def observe_wait(self, pool: str, band: int, waited_s: float) -> None:
        metrics.observe("tiered_queue_wait_seconds", waited_s, pool=pool, band=band)

    def export(
        self, snapshot: AdmissionSnapshot, live_replicas: dict[str, int], now: float | None = None
    ) -> None:
        now = time.monotonic() if now is None else now
        elapsed, self._last = max(0.0, now - self._last), now
        for pool, state in snapshot.pools.items():
            depths = state.queued_by_band
            seen = self._bands_seen.setdefault(pool, set()) | set(depths)
            self._bands_seen[pool] = seen
            for band in seen:  # a band that emptied reads 0, not its last depth
                metrics.set_gauge("tiered_queue_depth", depths.get(band, 0), pool=pool, band=band)
        for tenant, seats in snapshot.dedicated.items():
            utilization = min(1.0, seats.in_use / seats.capacity) if seats.capacity else 0.0
            metrics.set_gauge("tiered_reservation_utilization", utilization, tenant=tenant)
        for pool, facts in self.facts.items():
            live = live_replicas.get(pool, 0)
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
