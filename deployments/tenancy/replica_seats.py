"""The seats each pool's model-server replicas offer, from their heartbeats and deaths.

A replica reports its seats at each health check (every couple of seconds). One not heard
from for `HEARTBEAT_TTL_S` is no capacity. One known dead sooner (an ingress saw its
actor die under a request, or it retired itself) is dropped at once: a dedicated tenant
then spills instead of being sent to a reservation that is gone. When the ingress cannot
name the replica (a request failed before its first output), a dedicated pool drops every
replica, and each live one brings its seats back with its next heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass, field

HEARTBEAT_TTL_S = 15.0  # a model-server replica not heard from for this long is no capacity


@dataclass
class _Replica:
    seats: int
    seen: float
    actor_id: str


@dataclass
class ReplicaSeats:
    """pool key -> replica id -> what it last reported. A pool with a known loss and no
    replica heard from since has no seats (not the planned ones)."""

    replicas: dict[str, dict[str, _Replica]] = field(default_factory=dict)
    lost: set[str] = field(default_factory=set)

    def beat(
        self, pool_key: str, replica_id: str, seats: int, now: float, actor_id: str = ""
    ) -> None:
        self.replicas.setdefault(pool_key, {})[replica_id] = _Replica(seats, now, actor_id)
        self.lost.discard(pool_key)

    def drop(self, pool_key: str, actor_id: str | None, dedicated: bool) -> None:
        """Forget the replica whose actor died (every replica of a dedicated pool when
        unnamed)."""
        replicas = self.replicas.get(pool_key, {})
        if actor_id is not None:
            gone = [r for r, rep in replicas.items() if rep.actor_id == actor_id]
        else:
            gone = list(replicas) if dedicated else []
        for rid in gone:
            del replicas[rid]
        if gone or (dedicated and actor_id is None):
            self.lost.add(pool_key)

    def capacity(self, pool_key: str, planned: int, now: float | None = None) -> int:
        """Seats of the replicas alive; the planned seats until any has reported, 0 after
        a loss until one reports again."""
        live = self.live_seats(pool_key, now)
        if live or pool_key in self.lost:
            return live
        return planned

    def live_seats(self, pool_key: str, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        replicas = self.replicas.get(pool_key, {})
        for rid in [r for r, rep in replicas.items() if now - rep.seen > HEARTBEAT_TTL_S]:
            del replicas[rid]
        return sum(rep.seats for rep in replicas.values())

    def live_replicas(self, pool_key: str, now: float | None = None) -> int:
        """Replicas of a pool heard from within the heartbeat TTL."""
        now = time.monotonic() if now is None else now
        seen = self.replicas.get(pool_key, {}).values()
        return sum(1 for rep in seen if now - rep.seen <= HEARTBEAT_TTL_S)


@dataclass
class LossLog:
    """Numbered replica losses, for ingresses that long-poll them (`next_loss`): a request
    already sent to a deployment that lost its replica waits in Serve's router for a new
    one and never sees the death, so its ingress must hear of it from here."""

    seq: int = 0
    recent: deque[tuple[int, str]] = field(default_factory=lambda: deque(maxlen=256))
    _changed: asyncio.Event | None = None

    def add(self, pool_key: str) -> None:
        self.seq += 1
        self.recent.append((self.seq, pool_key))
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def after(self, seq: int, timeout_s: float) -> tuple[int, list[str]]:
        """(the latest number, pools lost after `seq`), once there is one or when
        `timeout_s` passed. A `seq` ahead of this log's (it restarted) gets the latest."""
        if seq >= self.seq:
            if seq == self.seq:
                if self._changed is None:
                    self._changed = asyncio.Event()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), timeout_s)
            if seq >= self.seq:
                return self.seq, []
        return self.seq, sorted({pool for n, pool in self.recent if n > seq})
