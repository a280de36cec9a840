"""The shared pool's fair dispatcher.

Requests queue only when every slot of the pool is busy. Then the next slot goes to the
highest priority band with waiters; inside a band, to the tenant with the smallest virtual
finish time on tokens (weighted fair queueing: a request costing c tokens advances its
tenant's clock by c / weight), and FIFO within a tenant. Every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field


class QueueTimeout(Exception):
    def __init__(self, waited_s: float, retry_after_s: float) -> None:
        super().__init__(f"queued {waited_s:.1f}s without a free slot")
        self.retry_after_s = retry_after_s


class QueueFull(Exception):
    pass


@dataclass(order=True)
class _Waiter:
    finish_tag: float
    seq: int
    tenant: str = field(compare=False)
    band: int = field(compare=False)
    future: asyncio.Future = field(compare=False, repr=False)
    cost: int = field(compare=False, default=0)
    enqueued: float = field(compare=False, default_factory=time.monotonic)


class FairDispatcher:
    def __init__(self, capacity: int, max_queue_len: int = 1024) -> None:
        self.capacity = capacity
        self.max_queue_len = max_queue_len
        self.in_use = 0
        self._waiters: list[_Waiter] = []
        self._virtual_time: dict[int, float] = {}
        self._tenant_finish: dict[tuple[int, str], float] = {}
        self._seq = itertools.count()
        self.served_tokens: dict[str, int] = {}
        self.wait_times: list[float] = []

    @property
    def depth(self) -> int:
        return len(self._waiters)

    def depth_by_band(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for w in self._waiters:
            out[w.band] = out.get(w.band, 0) + 1
        return out

    def set_capacity(self, capacity: int) -> None:
        """Autoscaling changed the pool; wake waiters if slots appeared."""
        self.capacity = capacity
        self._dispatch()

    async def acquire(
        self, tenant: str, band: int, weight: float, cost: int, deadline_s: float
    ) -> float:
        """Wait for a slot; returns seconds waited. Raises QueueTimeout or QueueFull."""
        if self.in_use < self.capacity and not self._waiters:
            self._grant(tenant, cost)
            return 0.0
        if len(self._waiters) >= self.max_queue_len:
            raise QueueFull(f"{len(self._waiters)} requests already queued")
        start = max(self._virtual_time.get(band, 0.0), self._tenant_finish.get((band, tenant), 0.0))
        finish = start + cost / weight
        self._tenant_finish[(band, tenant)] = finish
        future = asyncio.get_running_loop().create_future()
        waiter = _Waiter(finish, next(self._seq), tenant, band, future, cost)
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), deadline_s)
        except TimeoutError:
            if waiter.future.done() and not waiter.future.cancelled():
                return time.monotonic() - waiter.enqueued  # granted at the last moment
            self._remove(waiter)
            raise QueueTimeout(deadline_s, self._retry_estimate()) from None
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release()  # granted, but the caller went away: give the slot back
            else:
                self._remove(waiter)
            raise
        waited = time.monotonic() - waiter.enqueued
        self.wait_times.append(waited)
        return waited

    def release(self) -> None:
        self.in_use = max(0, self.in_use - 1)
        self._dispatch()

    def _grant(self, tenant: str, cost: int) -> None:
        self.in_use += 1
        self.served_tokens[tenant] = self.served_tokens.get(tenant, 0) + cost

    def _dispatch(self) -> None:
        while self._waiters and self.in_use < self.capacity:
            top_band = max(w.band for w in self._waiters)
            nxt = min(w for w in self._waiters if w.band == top_band)
            self._waiters.remove(nxt)
            self._virtual_time[top_band] = nxt.finish_tag
            self._grant(nxt.tenant, nxt.cost)
            nxt.future.set_result(True)

    def _remove(self, waiter: _Waiter) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)
        if not waiter.future.done():
            waiter.future.cancel()

    def _retry_estimate(self) -> float:
        mean_wait = sum(self.wait_times[-50:]) / max(1, len(self.wait_times[-50:]))
        return max(1.0, mean_wait)
