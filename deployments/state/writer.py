"""Batched, asynchronous ledger writes, off the request path.

`add` only appends to a deque: a request never waits on the database. A background task
writes what is pending every `interval_s` (sooner once `batch_size` records wait), one
multi-row statement per batch. When the database is down the records stay in memory and
the task retries with capped exponential backoff; the ledger's idempotent INSERT makes a
retried batch safe even when the failed attempt had in fact committed.

Nothing is ever dropped, even past `max_pending`: a lost record is unbilled usage that
no one can reconstruct, while memory grows by ~0.5 KB a record (a million is ~0.5 GB),
so an outage long enough to matter is paged on (one error log) rather than "fixed" by
forgetting revenue.

Call `add`/`add_reservation` on the event loop's thread (or before `start`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Sequence
from contextlib import suppress
from itertools import islice

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError

from deployments.state.config import parse_url
from deployments.state.errors import StateError
from deployments.state.ledger import Ledger
from deployments.state.store import short_reason
from deployments.state.types import ReservationSeconds
from deployments.tenancy.types import UsageRecord

log = logging.getLogger(__name__)

BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 2.0


class LedgerWriter:
    """Owns the pending records of one process and the task that commits them."""

    def __init__(
        self,
        ledger: Ledger,
        *,
        interval_s: float = 0.05,
        batch_size: int = 500,
        max_pending: int = 1_000_000,
        remember_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ledger = ledger
        self.interval_s = interval_s
        self.batch_size = batch_size
        self.max_pending = max_pending
        self.remember_s = remember_s
        self._clock = clock
        self._records: deque[UsageRecord] = deque()
        self._pending_ids: Counter[str] = Counter()  # request id -> copies in _records
        self._reservations: deque[ReservationSeconds] = deque()
        self._committed: OrderedDict[str, float] = OrderedDict()  # id -> when, oldest first
        self._added = [0, 0]  # records, reservations ever added
        self._written = [0, 0]  # ... and committed
        self._work = asyncio.Event()  # something is pending
        self._now = asyncio.Event()  # a batch is full, or someone waits: skip the timer
        self._progress = asyncio.Event()  # a write committed
        self._hurry = 0  # flush() calls waiting
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._overflow_logged = False
        self._outage_since: float | None = None
        self.batches = 0  # ledger statements committed

    # ---- the request path: O(1), never blocks, never raises ----------------------------
    def add(self, record: UsageRecord) -> None:
        self._records.append(record)
        self._pending_ids[record.request_id] += 1
        self._added[0] += 1
        self._wake(len(self._records))

    def add_reservation(self, row: ReservationSeconds) -> None:
        self._reservations.append(row)
        self._added[1] += 1
        self._wake(len(self._reservations))

    def _wake(self, queued: int) -> None:
        self._work.set()
        if queued >= self.batch_size:
            self._now.set()
        if self.pending > self.max_pending and not self._overflow_logged:
            self._overflow_logged = True
            log.error("ledger: %d records pending (max_pending %d): the database has not "
                      "taken writes for a long time; keeping them all", self.pending,
                      self.max_pending)

    @property
    def pending(self) -> int:
        """Records plus reservation rows not yet committed."""
        return len(self._records) + len(self._reservations)

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Start the background task on the running loop (again after stop)."""
        if self._task is None or self._task.done():
            self._stopping = False
            self._task = asyncio.get_running_loop().create_task(self._run(), name="ledger")

    async def flush(self, timeout_s: float) -> None:
        """Return once everything added before this call is committed; TimeoutError if
        that takes longer than `timeout_s` (the records stay pending)."""
        if self._task is None or self._task.done():
            raise RuntimeError("LedgerWriter is not running; call start() first")
        target = list(self._added)
        self._hurry += 1
        self._now.set()
        try:
            async with asyncio.timeout(timeout_s):
                while self._written[0] < target[0] or self._written[1] < target[1]:
                    self._progress.clear()
                    await self._progress.wait()
        finally:
            self._hurry -= 1

    async def stop(self, timeout_s: float = 10.0) -> int:
        """Write what is pending (for up to `timeout_s`), then end the task. Returns how
        many rows were left unwritten (logged as an error when not 0)."""
        task, self._task = self._task, None
        if task is None:
            return self.pending
        self._stopping = True
        self._work.set()
        self._now.set()
        _done, running = await asyncio.wait({task}, timeout=timeout_s)
        if running:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
        if self.pending:
            log.error("ledger: stopped with %d rows unwritten to %s", self.pending,
                      self.ledger.store.url)
        return self.pending

    # ---- what this writer knows --------------------------------------------------------
    def pending_ids(self, ids: Sequence[str]) -> set[str]:
        """Which ids wait here to be written (not yet committed)."""
        return {i for i in ids if i in self._pending_ids}

    async def committed_ids(self, ids: Sequence[str]) -> set[str]:
        """Which ids are committed: this writer's recent commits, else the database's
        answer (the truth after a restart). StateError when the database cannot say."""
        self._prune()
        mine = {i for i in ids if i in self._committed}
        rest = [i for i in ids if i not in self._committed]
        if not rest:
            return mine
        try:
            return mine | await self.ledger.committed(rest)
        except (SQLAlchemyError, OSError) as exc:
            raise StateError(
                f"ledger: cannot read committed ids from {self.ledger.store.url}: "
                f"{self._describe(exc)}"
            ) from None

    def _prune(self) -> None:
        horizon = self._clock() - self.remember_s
        while self._committed and next(iter(self._committed.values())) < horizon:
            self._committed.popitem(last=False)

    # ---- the background task -----------------------------------------------------------
    async def _run(self) -> None:
        backoff = BACKOFF_MIN_S
        while True:
            if not self.pending:
                if self._stopping:
                    return
                self._work.clear()
                await self._work.wait()
                continue
            if len(self._records) < self.batch_size and not (self._stopping or self._hurry):
                self._now.clear()
                with suppress(TimeoutError):
                    async with asyncio.timeout(self.interval_s):
                        await self._now.wait()
            try:
                await self._write_some()
            except Exception as exc:  # the task must outlive any failure: billing waits on it
                self._failed(exc)
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, BACKOFF_MAX_S)
                continue
            backoff = BACKOFF_MIN_S
            self._recovered()

    async def _write_some(self) -> None:
        """One ledger batch, then the pending reservation rows (up to a batch)."""
        batch = list(islice(self._records, self.batch_size))
        if batch:
            await self.ledger.write(batch)
            for r in batch:
                self._records.popleft()
                self._pending_ids[r.request_id] -= 1
                if not self._pending_ids[r.request_id]:
                    del self._pending_ids[r.request_id]
            now = self._clock()
            for r in batch:
                self._committed.setdefault(r.request_id, now)
            self._written[0] += len(batch)
            self.batches += 1
            self._progress.set()
        rows = list(islice(self._reservations, self.batch_size))
        if rows:
            await self.ledger.add_reservation_seconds(rows)
            for _ in rows:
                self._reservations.popleft()
            self._written[1] += len(rows)
            self._progress.set()
        self._prune()
        if self._overflow_logged and self.pending <= self.max_pending:
            self._overflow_logged = False

    def _describe(self, exc: BaseException) -> str:
        """The error's class, and for connection errors the driver's first line: never
        the statement or its parameters (record contents)."""
        if isinstance(exc, OperationalError | InterfaceError):
            reason = short_reason(exc, parse_url(self.ledger.store.spec.url))
            return f"{type(exc.orig).__name__}: {reason}"
        if isinstance(exc, DBAPIError):
            return type(exc.orig).__name__
        return type(exc).__name__

    def _failed(self, exc: BaseException) -> None:
        if self._outage_since is not None:
            return
        self._outage_since = self._clock()
        log.warning("ledger: writes to %s failing (%s); keeping %d rows, retrying",
                    self.ledger.store.url, self._describe(exc), self.pending)

    def _recovered(self) -> None:
        if self._outage_since is None:
            return
        took = self._clock() - self._outage_since
        self._outage_since = None
        log.warning("ledger: writes to %s recovered after %.1f s", self.ledger.store.url, took)
