"""Background duties of an ingress replica for the stateful API.

- Cancels: `POST /v1/responses/{id}/cancel` may reach any ingress replica. It marks the
  row cancelled in the store; each replica polls the store, once a second and in one
  query, for the stored responses it is generating, and stops those.
- Retention: expired responses and conversations are purged, and responses left
  `in_progress` by an ingress that died are marked failed. Every replica runs it; the
  deletes are idempotent, so running it twice costs a query, not correctness.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from datetime import UTC, datetime, timedelta

from deployments.state.conversations import ConversationStore
from deployments.state.errors import StateError
from deployments.state.responses import ResponseStore

log = logging.getLogger(__name__)

CANCEL_POLL_S = 1.0
PURGE_EVERY_S = 600.0


class Upkeep:
    def __init__(
        self,
        responses: ResponseStore,
        conversations: ConversationStore,
        stale_after_s: float,
        purge_every_s: float = PURGE_EVERY_S,
    ) -> None:
        self.responses = responses
        self.conversations = conversations
        self.stale_after_s = stale_after_s
        self.purge_every_s = purge_every_s
        self.running: dict[str, asyncio.Event] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._poll_cancels()),
            asyncio.create_task(self._purge_loop()),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def track(self, response_id: str) -> asyncio.Event:
        event = self.running[response_id] = asyncio.Event()
        return event

    def untrack(self, response_id: str) -> None:
        self.running.pop(response_id, None)

    def cancel_here(self, response_id: str) -> None:
        """The cancel reached the replica generating it: stop now, not at the next poll."""
        event = self.running.get(response_id)
        if event is not None:
            event.set()

    async def _poll_cancels(self) -> None:
        while True:
            await asyncio.sleep(CANCEL_POLL_S)
            ids = [rid for rid, event in self.running.items() if not event.is_set()]
            if not ids:
                continue
            try:
                cancelled = await asyncio.wait_for(self.responses.cancelled(ids), CANCEL_POLL_S)
            except (StateError, TimeoutError, OSError) as exc:
                log.debug("cancel poll skipped: %s", exc)
                continue
            for rid in cancelled:
                self.cancel_here(rid)

    async def purge_once(self) -> tuple[int, int, int]:
        """(responses purged, conversations purged, stale responses failed)."""
        now = datetime.now(UTC)
        stale = await self.responses.fail_stale(now - timedelta(seconds=self.stale_after_s))
        return (
            await self.responses.purge(now),
            await self.conversations.purge(now),
            stale,
        )

    async def _purge_loop(self) -> None:
        await asyncio.sleep(random.uniform(1.0, 10.0))  # replicas do not purge in step
        while True:
            try:
                purged = await self.purge_once()
                if any(purged):
                    log.info("retention: %d responses, %d conversations purged, "
                             "%d stale responses failed", *purged)
            except Exception:  # a database outage: try again next period
                log.warning("retention purge failed", exc_info=True)
            await asyncio.sleep(self.purge_every_s)
