"""One Responses turn from admission to the last byte: body or typed SSE events.

The same life as a chat completion (deployments.api.completions): the replica's outputs
are read until the engine finishes, the client goes away, or a cancel arrives. Before
the final event or body goes out, the turn is saved (the response row, the
conversation's new items) and its usage handed to admission, so a client that has read
`response.completed` can continue from it at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field

from fastapi.responses import JSONResponse, Response
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from deployments.api.claims import ClosingStreamingResponse
from deployments.api.coalesce import coalesced
from deployments.api.completions import Served, finished, open_stream, served_headers
from deployments.api.errors import OpenAIError, from_engine_error
from deployments.api.response_objects import ResponseDraft, ResponseEvents, response_object
from deployments.replicas.requests import ServedOutput
from deployments.state.errors import StateError
from deployments.tenancy.types import UsageStatus

log = logging.getLogger(__name__)


@dataclass
class ResponseRun:
    """A turn being generated: the draft the client sees, the ids the model sampled."""

    served: Served
    draft: ResponseDraft
    eos_ids: frozenset[int]
    save: Callable[[ResponseRun], Awaitable[None]]
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    token_ids: list[int] = field(default_factory=list)
    replica_id: str | None = None
    finish_reason: str | None = None

    def take(self, batch: list[ServedOutput]) -> str:
        """Fold steps in (several when coalesced, deployments.api.coalesce); the new text."""
        self.served.take(batch[-1])
        self.replica_id = batch[-1].replica_id
        text = ""
        for out in batch:
            for delta in out.output.deltas:
                text += delta.text
                self.token_ids.extend(delta.token_ids)
                self.finish_reason = delta.finish_reason or self.finish_reason
        self.draft.text += text
        usage = self.served.usage
        self.draft.input_tokens = usage.prompt_tokens
        self.draft.cached_tokens = usage.cached_tokens
        self.draft.output_tokens = usage.completion_tokens
        return text

    def end(self, cancelled: bool) -> None:
        """The draft's final status. The end-of-turn token leaves the stored ids: the
        chat template closes the turn itself when it renders the history."""
        while self.token_ids and self.token_ids[-1] in self.eos_ids:
            self.token_ids.pop()
        if cancelled:
            self.draft.status = "cancelled"
        elif self.finish_reason == "length":
            self.draft.status = "incomplete"
            self.draft.incomplete_reason = "max_output_tokens"
        else:
            self.draft.status = "completed"

    def fail(self, error: OpenAIError) -> None:
        self.draft.status = "failed"
        self.draft.error = {"code": error.code or "server_error", "message": error.message}


async def _save_or_fail(run: ResponseRun) -> None:
    try:
        await run.save(run)
    except StateError as exc:
        log.warning("response %s not saved: %s", run.draft.id, exc)
        raise OpenAIError(
            503, "The response was generated but could not be saved; the state store is "
            "unavailable. Retry the request.", code="state_store_unavailable",
        ) from None


async def _save_failed(run: ResponseRun, error: OpenAIError) -> None:
    run.fail(error)
    try:
        await run.save(run)
    except StateError as exc:
        log.warning("failed response %s not saved: %s", run.draft.id, exc)


async def respond_response(
    run: ResponseRun, handle: DeploymentHandle, stream: bool, headers: dict[str, str]
) -> Response:
    served = run.served
    try:
        outputs, first = await open_stream(served, handle)
    except OpenAIError as exc:
        await _save_failed(run, exc)
        raise
    run.draft.service_tier = served.tier  # a lost replica's request may have spilled
    headers = served_headers(served, first, headers)
    if stream:
        return ClosingStreamingResponse(
            _events(run, first, outputs), media_type="text/event-stream", headers=headers
        )
    status: UsageStatus = "client_disconnect"
    try:
        out = first
        while True:
            run.take([out])
            if out.output.finished or run.cancelled.is_set():
                break
            out = await outputs.__anext__()
        run.end(cancelled=not out.output.finished)
        status = "ok"
        await _save_or_fail(run)
    except OpenAIError:
        raise
    except Exception as exc:
        status = "error"
        served.failed(exc)
        mapped = from_engine_error(exc)
        if mapped is None:
            raise
        await _save_failed(run, mapped)
        raise mapped from None
    finally:
        outputs.cancel()
        await served.close(status)
    return JSONResponse(response_object(run.draft), headers=headers)


async def _events(
    run: ResponseRun, first: ServedOutput, outputs: DeploymentResponseGenerator
) -> AsyncIterator[str]:
    events = ResponseEvents(run.draft)
    status: UsageStatus = "client_disconnect"
    try:
        for frame in events.opening():
            yield frame
        ended = False
        steps = coalesced(first, outputs, run.served.coalesce_s, finished)
        async with aclosing(steps) as batches:
            async for batch in batches:
                text = run.take(batch)
                if text:
                    yield events.delta(text)
                ended = finished(batch[-1])
                if ended or run.cancelled.is_set():
                    break
        run.end(cancelled=not ended)
        status = "ok"
        await _save_or_fail(run)
        await run.served.close(status)  # usage with admission before the client reads the end
        for frame in events.closing():
            yield frame
    except OpenAIError as exc:  # saved state unavailable: the client must not continue
        for frame in _failed(run, events, exc):
            yield frame
    except Exception as exc:  # the replica failed mid-stream
        status = "error"
        run.served.failed(exc)
        mapped = from_engine_error(exc)
        if mapped is None:
            log.exception("stream of %s failed", run.draft.id)
            mapped = OpenAIError(503, "The model server failed.")
        await _save_failed(run, mapped)
        for frame in events.failed():
            yield frame
    finally:
        outputs.cancel()
        await run.served.close(status)


def _failed(run: ResponseRun, events: ResponseEvents, error: OpenAIError) -> list[str]:
    run.fail(error)
    return events.failed()
