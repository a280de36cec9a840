"""Asyncio front end: the engine steps in its own thread, callers stream deltas.

Model compute never runs on the event loop. Callers validate in their own thread (so bad
input raises at once), then hand prepared work to the loop thread through a command queue;
outputs come back with `call_soon_threadsafe`. Closing or cancelling a stream aborts the
request, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator

from models.engine import LLMEngine, PreparedRequest
from models.engine_config import EngineConfig
from models.errors import EngineDeadError, EngineOverloadedError, InvalidRequestError
from models.outputs import EngineStats, RequestOutput, merge_outputs
from models.sampling_params import SamplingParams
from models.tp import ParallelContext

log = logging.getLogger(__name__)

_Item = RequestOutput | BaseException  # a step's output, or the error that ends the stream
_Sink = tuple[asyncio.AbstractEventLoop, asyncio.Queue[_Item]]


class AsyncLLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        parallel: ParallelContext | None = None,
        stall_timeout_s: float = 30.0,
    ) -> None:
        self.engine = LLMEngine(config, parallel)
        self.tokenizer = self.engine.tokenizer
        self.model_config = self.engine.model_config
        self.stall_timeout_s = stall_timeout_s
        self._commands: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._sinks: dict[str, _Sink] = {}
        self._sinks_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._draining = False
        self._last_progress = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="tiered-engine", daemon=True)
        self._thread.start()

    # ---- caller side ----------------------------------------------------------------
    async def generate(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        *,
        priority: int = 0,
        cache_salt: str | None = None,
        retain: bool = False,
    ) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs; `retain` keeps its KV blocks ahead of ordinary
        requests' in eviction (a conversation turn that is likely to be continued)."""
        self._raise_if_unavailable()
        prepared = self.engine.prepare(
            request_id, prompt, params, priority=priority, cache_salt=cache_salt, retain=retain
        )
        sink: asyncio.Queue[_Item] = asyncio.Queue()
        with self._sinks_lock:
            if request_id in self._sinks:
                raise InvalidRequestError(f"duplicate request id {request_id!r}", "request_id")
            self._sinks[request_id] = (asyncio.get_running_loop(), sink)
        self._send("add", prepared)
        finished = False
        try:
            while True:
                batch = [await sink.get()]
                while not sink.empty():  # coalesce what piled up while the reader was away
                    batch.append(sink.get_nowait())
                errors = [b for b in batch if isinstance(b, BaseException)]
                outputs = [b for b in batch if not isinstance(b, BaseException)]
                if outputs:
                    item = merge_outputs(outputs)
                    finished = item.finished
                    yield item
                if errors:
                    raise errors[0]
                if finished:
                    return
        finally:
            with self._sinks_lock:
                self._sinks.pop(request_id, None)
            if not finished:
                self._send("abort", request_id)

    def abort(self, request_id: str) -> None:
        self._send("abort", request_id)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    @property
    def num_in_flight(self) -> int:
        with self._sinks_lock:
            return len(self._sinks)

    def check_health(self) -> None:
        """Raise EngineDeadError if the loop died, or has work but made no progress lately."""
        if self._error is not None:
            raise EngineDeadError(f"engine loop died: {self._error!r}")
        if not self._thread.is_alive() and not self._stop.is_set():
            raise EngineDeadError("engine loop thread exited")
        idle = time.monotonic() - self._last_progress
        if self.engine.has_unfinished() and idle > self.stall_timeout_s:
            raise EngineDeadError(f"engine loop stalled for {idle:.1f}s with work pending")

    async def shutdown(self, drain_timeout_s: float = 0.0) -> None:
        """Stop admitting, let in-flight requests finish for up to the timeout, then stop."""
        self._draining = True
        deadline = time.monotonic() + drain_timeout_s
        while self.num_in_flight and time.monotonic() < deadline and self._error is None:
            await asyncio.sleep(0.05)
        self._fail_all(EngineOverloadedError("the model server is shutting down"))
        self._stop.set()
        self._wake.set()
        await asyncio.to_thread(self._thread.join, 30.0)

    # ---- engine thread --------------------------------------------------------------
    def _raise_if_unavailable(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"engine loop died: {self._error!r}")
        if self._draining or self._stop.is_set():
            raise EngineOverloadedError("the model server is draining and takes no new requests")

    def _send(self, kind: str, payload: object) -> None:
        self._commands.put((kind, payload))
        self._wake.set()

    def _apply_commands(self) -> None:
        while True:
            try:
                kind, payload = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                assert isinstance(payload, PreparedRequest)
                with self._sinks_lock:
                    alive = payload.request_id in self._sinks
                if alive:
                    self.engine.admit(payload)
            elif kind == "abort":
                self.engine.abort(str(payload))

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._apply_commands()
                if not self.engine.has_unfinished():
                    self._last_progress = time.monotonic()
                    self._wake.wait(0.1)
                    self._wake.clear()
                    continue
                outputs = self.engine.step()
                self._last_progress = time.monotonic()
                for out in outputs:
                    self._deliver(out.request_id, out)
            self._apply_commands()
            self.engine.shutdown()
        except BaseException as exc:
            log.exception("engine loop died")
            self._error = exc
            self._fail_all(EngineDeadError(f"engine loop died: {exc!r}"))

    def _deliver(self, request_id: str, item: _Item) -> None:
        with self._sinks_lock:
            sink = self._sinks.get(request_id)
        if sink is None:
            return
        loop, q = sink
        with contextlib.suppress(RuntimeError):  # the caller's loop may be closed
            loop.call_soon_threadsafe(q.put_nowait, item)

    def _fail_all(self, error: BaseException) -> None:
        with self._sinks_lock:
            ids = list(self._sinks)
        for request_id in ids:
            self._deliver(request_id, error)
