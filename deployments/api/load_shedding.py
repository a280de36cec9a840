"""Load shedding at the ingress: a 503 with Retry-After, at once, while its event loop lags.

An ingress replica does its per-request work (auth, validation, tokenization, streaming)
on one event loop. Flooded, the loop runs late and every request on it slows, the ones
within their limits included. A timer that should wake every `tick` measures how late it
wakes; while the loop is later than the deadline (or was, within the last HOLD_S), new
inference requests are refused before their body is read, with OpenAI's error JSON, and
the requests already running keep the loop to themselves.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from deployments.api.errors import OpenAIError, send_error

HOLD_S = 1.0  # shed this long after a late tick; also the Retry-After
MAX_TICK_S = 0.05
SHED_MESSAGE = "The server is overloaded; retry shortly."
# The deadline by app title, per process: as for the body limit (deployments.api.errors),
# the served app is a copy of the module's, and only the ingress constructor knows it.
_MONITORS: dict[str, LoopLag] = {}


@dataclass
class LoopLag:
    """How late this event loop runs a timer; started on the loop it measures."""

    deadline_s: float
    hold_s: float = HOLD_S
    due: float = 0.0  # when the running tick should wake (loop time)
    late_until: float = 0.0  # shedding at least until then (loop time)
    worst_s: float = 0.0  # the latest tick's lag
    _task: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def tick_s(self) -> float:
        return min(self.deadline_s / 2, MAX_TICK_S)

    def start(self) -> None:
        """Start measuring the running loop (once; again if that task ended)."""
        if self._task is None or self._task.done():
            loop = asyncio.get_running_loop()
            self.due = loop.time() + self.tick_s
            self._task = loop.create_task(self._run(), name="loop-lag")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self.due = loop.time() + self.tick_s
            await asyncio.sleep(self.tick_s)
            now = loop.time()
            self.worst_s = now - self.due
            if self.worst_s > self.deadline_s:
                self.late_until = now + self.hold_s

    def lagging(self) -> bool:
        """The running tick is overdue past the deadline, or one was within hold_s."""
        now = asyncio.get_running_loop().time()
        return now - self.due > self.deadline_s or now < self.late_until

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None


def set_shed_deadline(app: FastAPI, deadline_s: float) -> None:
    """Shed `app`'s inference requests while its loop lags past `deadline_s` (0: never),
    in this process."""
    old = _MONITORS.pop(app.title, None)
    if old is not None:
        old.stop()
    if deadline_s > 0:
        _MONITORS[app.title] = LoopLag(deadline_s)


def overloaded() -> OpenAIError:
    retry = {"retry-after": str(int(HOLD_S)), "retry-after-ms": str(int(HOLD_S * 1000))}
    return OpenAIError(503, SHED_MESSAGE, code="server_overloaded", headers=retry)


class LoadShedding:
    """Pure ASGI middleware: 503 for POST /v1/… while the loop lags (LoopLag)."""

    def __init__(self, app: ASGIApp, key: str, prefix: str = "/v1/") -> None:
        self.app, self.key, self.prefix = app, key, prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        monitor = _MONITORS.get(self.key)
        if (
            monitor is not None
            and scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"].startswith(self.prefix)
        ):
            monitor.start()
            if monitor.lagging():
                await send_error(overloaded(), scope, send)
                return
        await self.app(scope, receive, send)
