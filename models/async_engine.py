"""Asyncio front end: the engine steps in its own thread, callers stream deltas.

Model compute never runs on the event loop. Callers validate in their own thread (so bad
input raises at once), then hand prepared work to the loop thread through a command queue;
outputs come back with `call_soon_threadsafe`. Closing or cancelling a stream aborts the
request, which frees its KV blocks.

A LoRA load is staged (fetched, validated, read on rank 0) in a helper thread, then installed
on every rank by the engine thread between steps, so the replica keeps serving meanwhile.
Concurrent requests for the same new adapter share one load.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TypeVar

from models.engine import LLMEngine, PreparedRequest
from models.engine_config import EngineConfig
from models.errors import EngineDeadError, EngineOverloadedError, InvalidRequestError
from models.lora import LoRARequest
from models.lora_fetch import StagedAdapter
from models.outputs import EngineStats, RequestOutput, merge_outputs
from models.sampling_params import SamplingParams
from models.tp import ParallelContext

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_Item = RequestOutput | BaseException  # a step's output, or the error that ends the stream
_Sink = tuple[asyncio.AbstractEventLoop, asyncio.Queue[_Item]]


@dataclass
class _Install:
    """Engine thread: install a staged adapter on every rank, then resolve `done`."""

    staged: StagedAdapter
    done: Future[None]


@dataclass
class _Unload:
    name: str
    done: Future[bool]


class AsyncLLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        parallel: ParallelContext | None = None,
        stall_timeout_s: float = 30.0,
        lora_load_timeout_s: float = 300.0,
    ) -> None:
        self.engine = LLMEngine(config, parallel)
        self.tokenizer = self.engine.tokenizer
        self.model_config = self.engine.model_config
        self.stall_timeout_s = stall_timeout_s
        self.lora_load_timeout_s = lora_load_timeout_s
        self._loads: dict[str, Future[None]] = {}  # adapter key -> the load under way
        self._loads_lock = threading.Lock()
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
        lora: LoRARequest | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs; `retain` keeps its KV blocks ahead of ordinary
        requests' in eviction (a conversation turn that is likely to be continued). With
        `lora`, the adapter is loaded first if needed (LoRALoadError if it cannot be)."""
        self._raise_if_unavailable()
        if lora is not None:
            await self.load_lora(lora)
        prepared = self.engine.prepare(
            request_id,
            prompt,
            params,
            priority=priority,
            cache_salt=cache_salt,
            retain=retain,
            lora=lora,
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

    async def load_lora(self, lora: LoRARequest) -> float:
        """Load an adapter on every rank; seconds taken, 0.0 when already held. Raises
        LoRALoadError for a bad adapter, EngineOverloadedError past the deadline."""
        self._raise_if_unavailable()
        start = time.monotonic()
        if self.engine.lora_held(lora):
            return 0.0
        await self._await(self._start_load(lora), f"loading adapter {lora.key}")
        return time.monotonic() - start

    async def unload_lora(self, name: str) -> bool:
        """Stop serving adapter `name`; its admitted requests finish on it first."""
        self._raise_if_unavailable()
        done: Future[bool] = Future()
        self._send("unload_lora", _Unload(name, done))
        return await self._await(done, f"unloading adapter {name}")

    async def _await(self, done: Future[_T], what: str) -> _T:
        try:
            return await asyncio.wait_for(
                asyncio.shield(asyncio.wrap_future(done)), self.lora_load_timeout_s
            )
        except TimeoutError:
            raise EngineOverloadedError(
                f"{what} did not finish within {self.lora_load_timeout_s:.0f}s"
            ) from None

    def _start_load(self, lora: LoRARequest) -> Future[None]:
        """The load of `lora` under way, or a new one: staged in a helper thread, then
        installed by the engine thread."""
        with self._loads_lock:
            done = self._loads.get(lora.key)
            if done is not None:
                return done
            done = Future()
            self._loads[lora.key] = done
        done.add_done_callback(lambda _: self._forget_load(lora.key))
        threading.Thread(
            target=self._stage, args=(lora, done), name="tiered-lora-stage", daemon=True
        ).start()
        return done

    def _forget_load(self, key: str) -> None:
        with self._loads_lock:
            self._loads.pop(key, None)

    def _stage(self, lora: LoRARequest, done: Future[None]) -> None:
        try:
            staged = self.engine.stage_lora(lora)
        except Exception as exc:  # LoRALoadError, or a bug: either way the caller hears it
            done.set_exception(exc)
            return
        self._send("install_lora", _Install(staged, done))

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
                    self._admit(payload)
            elif kind == "abort":
                self.engine.abort(str(payload))
            elif kind == "install_lora":
                assert isinstance(payload, _Install)
                try:
                    self.engine.install_lora(payload.staged)
                except BaseException as exc:
                    payload.done.set_exception(exc)
                    if not isinstance(exc, InvalidRequestError):
                        raise  # a collective failed: the TP group is gone
                else:
                    payload.done.set_result(None)
            elif kind == "unload_lora":
                assert isinstance(payload, _Unload)
                payload.done.set_result(self.engine.unload_lora(payload.name))

    def _admit(self, prepared: PreparedRequest) -> None:
        """Admit, or end the stream with the error: its adapter may have been evicted since
        the caller loaded it, and reloading it here can fail."""
        try:
            self.engine.admit(prepared)
        except InvalidRequestError as exc:
            self._deliver(prepared.request_id, exc)

    def _fail_commands(self, error: BaseException) -> None:
        """The loop died: fail pending adapter loads and unloads now, not at their deadline."""
        while True:
            try:
                _, payload = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(payload, _Install):
                payload.staged.copy.release()
            if isinstance(payload, _Install | _Unload):
                payload.done.set_exception(error)

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._apply_commands()
                self.engine.keep_alive()
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
            self._fail_commands(EngineDeadError(f"engine loop died: {exc!r}"))

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
