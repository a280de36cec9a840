"""The shared pool's fair dispatcher: pure asyncio, no Ray.

Requests queue only when every slot of the pool is busy (capacity = replicas ×
max_num_seqs, changed at runtime by autoscaling). The next free slot goes to:

1. the highest priority band with waiters (strict);
2. inside it, the tenant whose head request has the smallest virtual finish time on
   tokens (start-time fair queueing: start = max(band clock, tenant's last finish),
   finish = start + cost / weight). Weights 2:1 get tokens 2:1 while both are
   backlogged, and a big request costs more than a small one;
3. FIFO within a tenant.

A request gets its tags when it reaches the head of its tenant's queue, and the tenant's
clock moves only when it is granted, so a waiter that times out or is cancelled leaves no
trace. Releasing a ticket with the tokens really used corrects its tenant's clock (a
request reserved at max_tokens that stopped early is refunded).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

RECENT = 256  # waits and hold times kept for stats and retry estimates
MIN_RETRY_S, MAX_RETRY_S = 1.0, 60.0


class QueueTimeout(Exception):
    """The wait passed its deadline; `retry_after_s` estimates when a slot frees."""

    def __init__(self, waited_s: float, retry_after_s: float) -> None:
        super().__init__(f"queued {waited_s:.1f}s without a free slot")
        self.waited_s, self.retry_after_s = waited_s, retry_after_s


class QueueFull(Exception):
    """Too many waiters already; refused without queueing."""

    def __init__(self, message: str, retry_after_s: float = MIN_RETRY_S) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class Ticket:
    """One granted slot. Give it back with FairDispatcher.release(ticket, actual_tokens)."""

    tenant: str
    band: int
    weight: float
    cost: int
    waited_s: float
    granted_at: float = field(default_factory=time.monotonic)
    released: bool = False


@dataclass
class BandStats:
    queued: int
    tenants_waiting: int
    granted: int
    queued_grants: int
    timeouts: int
    cancelled: int
    mean_wait_s: float
    p95_wait_s: float
    max_wait_s: float


@dataclass(eq=False)  # identity: a waiter is removed as itself
class _Waiter:
    seq: int
    tenant: str
    band: int
    weight: float
    cost: int
    future: asyncio.Future[Ticket]
    enqueued: float = field(default_factory=time.monotonic)
    clock_at_head: float = 0.0  # band clock when it became its tenant's head
    start: float = 0.0
    finish: float = 0.0


@dataclass
class _Band:
    clock: float = 0.0  # virtual time: the largest start tag granted so far
    finish: dict[str, float] = field(default_factory=dict)  # tenant -> last finish tag
    queues: dict[str, deque[_Waiter]] = field(default_factory=dict)
    waits: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT))
    granted: int = 0
    queued_grants: int = 0
    timeouts: int = 0
    cancelled: int = 0

    def depth(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def tag_head(self, tenant: str, keep_clock: bool = False) -> None:
        """Tags of the tenant's head request (its start waits for the tenant's last
        finish, but never starts before the band clock when it reached the head)."""
        queue = self.queues.get(tenant)
        if not queue:
            return
        head = queue[0]
        if not keep_clock:
            head.clock_at_head = self.clock
        head.start = max(head.clock_at_head, self.finish.get(tenant, 0.0))
        head.finish = head.start + head.cost / head.weight

    def charge(self, tenant: str, start: float, finish: float) -> None:
        self.finish[tenant] = finish
        self.clock = max(self.clock, start)
        self.granted += 1


class FairDispatcher:
    """Slots of one pool, handed out by band, then weighted fair share, then FIFO."""

    def __init__(self, capacity: int | Callable[[], int], max_queue_len: int = 1024) -> None:
        self._capacity = capacity
        self.max_queue_len = max_queue_len
        self.in_use = 0
        self._bands: dict[int, _Band] = {}
        self._seq = itertools.count()
        self._holds: deque[float] = deque(maxlen=RECENT)
        self.served_tokens: dict[str, int] = {}
        self.wait_times: list[float] = []  # recent queued waits, oldest first

    # ---- capacity and introspection ----------------------------------------------
    @property
    def capacity(self) -> int:
        value = self._capacity() if callable(self._capacity) else self._capacity
        return max(0, int(value))

    def set_capacity(self, capacity: int | Callable[[], int]) -> None:
        """Autoscaling changed the pool; wake waiters if slots appeared. Shrinking never
        revokes a granted slot: new grants wait until in_use is under the new capacity."""
        self._capacity = capacity
        self.poke()

    def poke(self) -> None:
        """Re-check capacity (a capacity function's answer may have changed)."""
        self._dispatch()

    @property
    def depth(self) -> int:
        return sum(b.depth() for b in self._bands.values())

    def depth_by_band(self) -> dict[int, int]:
        return {band: b.depth() for band, b in self._bands.items() if b.depth()}

    def stats(self) -> dict[int, BandStats]:
        """Per band, highest first: queue depth, grants, timeouts and recent waits."""
        out = {}
        for band, b in sorted(self._bands.items(), reverse=True):
            waits = sorted(b.waits)
            out[band] = BandStats(
                queued=b.depth(),
                tenants_waiting=sum(1 for q in b.queues.values() if q),
                granted=b.granted,
                queued_grants=b.queued_grants,
                timeouts=b.timeouts,
                cancelled=b.cancelled,
                mean_wait_s=sum(waits) / len(waits) if waits else 0.0,
                p95_wait_s=waits[min(len(waits) - 1, int(0.95 * len(waits)))] if waits else 0.0,
                max_wait_s=waits[-1] if waits else 0.0,
            )
        return out

    def retry_after_estimate(self, ahead: int | None = None) -> float:
        """Seconds until a newcomer behind `ahead` waiters would likely get a slot."""
        ahead = self.depth if ahead is None else ahead
        if self._holds:
            hold = sum(self._holds) / len(self._holds)
            estimate = (ahead + 1) * hold / max(1, self.capacity)
        else:
            recent = self.wait_times[-50:]
            estimate = sum(recent) / len(recent) if recent else MIN_RETRY_S
        return min(MAX_RETRY_S, max(MIN_RETRY_S, estimate))

    # ---- acquire and release -------------------------------------------------------
    async def acquire(
        self, tenant: str, band: int, weight: float, cost: int, deadline_s: float
    ) -> Ticket:
        """A slot now if one is free and nobody waits; else queue until granted.

        Raises QueueFull at once when max_queue_len requests wait, QueueTimeout after
        `deadline_s`. A cancelled caller leaves the queue, or gives back a slot granted
        in the same tick.
        """
        if weight <= 0 or cost < 0:
            raise ValueError(f"weight must be > 0 and cost >= 0, got {weight}, {cost}")
        state = self._bands.setdefault(band, _Band())
        if self.in_use < self.capacity and self.depth == 0:
            return self.grant_now(tenant, band, weight, cost)
        depth = self.depth
        if depth >= self.max_queue_len:
            raise QueueFull(f"{depth} requests already queued", self.retry_after_estimate())
        future: asyncio.Future[Ticket] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(next(self._seq), tenant, band, weight, cost, future)
        queue = state.queues.setdefault(tenant, deque())
        queue.append(waiter)
        if len(queue) == 1:
            state.tag_head(tenant)
        try:
            # Await the future itself: a cancel then reaches this frame even when the
            # grant landed in the same tick (wait_for would swallow it on 3.11).
            async with asyncio.timeout(max(0.0, deadline_s)):
                return await future
        except TimeoutError:
            if future.done() and not future.cancelled():
                return future.result()  # granted at the last moment
            self._remove(waiter)
            state.timeouts += 1
            waited = time.monotonic() - waiter.enqueued
            raise QueueTimeout(waited, self.retry_after_estimate()) from None
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(future.result())  # granted, but the caller went away
            else:
                self._remove(waiter)
                state.cancelled += 1
            raise

    def grant_now(self, tenant: str, band: int, weight: float, cost: int) -> Ticket:
        """A slot taken at once, over capacity if need be: a seat that is already in use
        (re-registered after the admission actor restarted) must be counted, not queued."""
        state = self._bands.setdefault(band, _Band())
        start = max(state.clock, state.finish.get(tenant, 0.0))
        state.charge(tenant, start, start + cost / weight)
        return self._ticket(tenant, band, weight, cost, waited=0.0)

    def release(self, ticket: Ticket | None = None, actual_tokens: int | None = None) -> None:
        """Free a slot. With the ticket and the tokens really used, the tenant's clock is
        corrected by (actual - reserved) / weight. Releasing a ticket twice is a no-op."""
        if ticket is not None:
            if ticket.released:
                return
            ticket.released = True
            self._holds.append(time.monotonic() - ticket.granted_at)
            if actual_tokens is not None:
                self._settle(ticket, max(0, actual_tokens))
        self.in_use = max(0, self.in_use - 1)
        self._dispatch()

    # ---- internals -----------------------------------------------------------------
    def _settle(self, ticket: Ticket, actual: int) -> None:
        delta = actual - ticket.cost
        state = self._bands.get(ticket.band)
        if state is not None and ticket.tenant in state.finish:
            state.finish[ticket.tenant] += delta / ticket.weight
            state.tag_head(ticket.tenant, keep_clock=True)
        self.served_tokens[ticket.tenant] = self.served_tokens.get(ticket.tenant, 0) + delta

    def _ticket(self, tenant: str, band: int, weight: float, cost: int, waited: float) -> Ticket:
        self.in_use += 1
        self.served_tokens[tenant] = self.served_tokens.get(tenant, 0) + cost
        return Ticket(tenant, band, weight, cost, waited)

    def _dispatch(self) -> None:
        while self.in_use < self.capacity:
            waiter = self._next_waiter()
            if waiter is None:
                return
            state = self._bands[waiter.band]
            state.queues[waiter.tenant].popleft()
            if waiter.future.done():  # cancelled; its frame has not run yet to remove it
                state.tag_head(waiter.tenant)
                continue
            state.charge(waiter.tenant, waiter.start, waiter.finish)
            state.tag_head(waiter.tenant)
            waited = time.monotonic() - waiter.enqueued
            state.queued_grants += 1
            state.waits.append(waited)
            self.wait_times.append(waited)
            if len(self.wait_times) > 2 * RECENT:
                del self.wait_times[:RECENT]
            ticket = self._ticket(waiter.tenant, waiter.band, waiter.weight, waiter.cost, waited)
            waiter.future.set_result(ticket)

    def _next_waiter(self) -> _Waiter | None:
        for band in sorted(self._bands, reverse=True):
            heads = [q[0] for q in self._bands[band].queues.values() if q]
            if heads:
                return min(heads, key=lambda w: (w.finish, w.seq))
        return None

    def _remove(self, waiter: _Waiter) -> None:
        state = self._bands[waiter.band]
        queue = state.queues.get(waiter.tenant)
        if queue is not None and waiter in queue:
            was_head = queue[0] is waiter
            queue.remove(waiter)
            if was_head:
                state.tag_head(waiter.tenant)
        if not waiter.future.done():
            waiter.future.cancel()
