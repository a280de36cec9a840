"""Stops the streams of a caller that died.

Ray does not end a replica's streaming call when the actor reading it dies (Serve cancels
it only when the caller cancels it), so a crashed ingress's streams would run on in the
engine to `max_tokens` for no one: holding seats and KV blocks, and billed as orphans
(deployments/replicas/usage_backup.py) for every token. Each ingress names its own replica
actor in the request; while a caller has streams open here, its actor is pinged every
`PING_INTERVAL_S`, and once Ray says it died its streams are cancelled as a client
disconnect is (the engine aborts them, the usage backup counts what they produced).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import ray
from ray.actor import ActorHandle
from ray.exceptions import ActorDiedError, ActorUnavailableError

log = logging.getLogger(__name__)
SERVE_NAMESPACE = "serve"  # where Serve names its replica actors
PING_INTERVAL_S = 0.25
PING_TIMEOUT_S = 5.0  # a busy caller answers late; only a death cancels


class CallerWatch:
    """The streams open for each caller, and a loop that cancels a dead caller's."""

    def __init__(self, interval_s: float = PING_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._streams: dict[str, set[asyncio.Task]] = {}
        self._handles: dict[str, ActorHandle] = {}
        self._loop: asyncio.Task | None = None

    @contextmanager
    def watching(self, caller: str | None) -> Iterator[None]:
        """While inside, the current task (the one reading this stream) is cancelled if
        `caller` (a Serve replica actor's name) dies; None watches nothing."""
        task = asyncio.current_task()
        if caller is None or task is None:
            yield
            return
        self._streams.setdefault(caller, set()).add(task)
        if self._loop is None or self._loop.done():
            self._loop = asyncio.create_task(self._run())
        try:
            yield
        finally:
            tasks = self._streams.get(caller)
            if tasks is not None:
                tasks.discard(task)
                if not tasks:
                    del self._streams[caller]
                    self._handles.pop(caller, None)

    async def _run(self) -> None:
        while self._streams:
            await asyncio.sleep(self.interval_s)
            callers = list(self._streams)
            dead = await asyncio.gather(*(self._is_dead(c) for c in callers))
            for caller, gone in zip(callers, dead, strict=True):
                if gone:
                    self._cancel(caller)

    def _cancel(self, caller: str) -> None:
        tasks = self._streams.pop(caller, set())
        self._handles.pop(caller, None)
        log.warning("caller %s died: cancelling its %d stream(s)", caller, len(tasks))
        for task in tasks:
            task.cancel()

    async def _is_dead(self, caller: str) -> bool:
        try:
            handle = self._handles.get(caller)
            if handle is None:
                handle = await asyncio.to_thread(ray.get_actor, caller, SERVE_NAMESPACE)
                self._handles[caller] = handle
            await asyncio.wait_for(handle.__ray_ready__.remote(), PING_TIMEOUT_S)
        except (ValueError, ActorDiedError):  # its name is gone, or Ray says it died
            return True
        except (ActorUnavailableError, TimeoutError):  # unreachable for now, or busy
            return False
        return False
