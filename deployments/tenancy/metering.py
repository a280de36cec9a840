"""Reserved replica-seconds, from the heartbeats of dedicated model-server replicas.

A dedicated tenant pays for the replicas held for it, busy or idle; utilization is the
tokens they served against the seconds held. Each heartbeat adds the time since that
replica's previous one, split at UTC hour boundaries (the ledger sums per hour). A gap
longer than `max_gap_s` (the replica was gone) counts nothing, and neither does a
replica's first heartbeat: under-counting by one interval is the safe side of a bill.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from deployments.state.types import ReservationSeconds

HOUR_S = 3600.0


def split_by_hour(start: float, end: float) -> list[tuple[datetime, float]]:
    """[(UTC hour start, seconds of [start, end) within it)], oldest first."""
    out: list[tuple[datetime, float]] = []
    at = start
    while at < end:
        hour = datetime.fromtimestamp(at, UTC).replace(minute=0, second=0, microsecond=0)
        hour_end = (hour + timedelta(hours=1)).timestamp()
        upto = min(end, hour_end)
        out.append((hour, upto - at))
        at = upto
    return out


class ReservationClock:
    def __init__(self, max_gap_s: float) -> None:
        self.max_gap_s = max_gap_s
        self._seen: dict[tuple[str, str], float] = {}  # (tenant, replica) -> wall clock

    def beat(
        self, tenant: str, model: str, replica_id: str, now: float | None = None
    ) -> list[ReservationSeconds]:
        now = time.time() if now is None else now
        key = (tenant, replica_id)
        previous = self._seen.get(key)
        self._seen[key] = now
        self._forget(now)
        if previous is None or not 0 < now - previous <= self.max_gap_s:
            return []
        return [
            ReservationSeconds(tenant, model, replica_id, hour, seconds)
            for hour, seconds in split_by_hour(previous, now)
        ]

    def _forget(self, now: float) -> None:
        for key in [k for k, seen in self._seen.items() if now - seen > self.max_gap_s]:
            del self._seen[key]
