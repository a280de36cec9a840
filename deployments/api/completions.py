"""One completion from admission to the last byte: stream or body, usage, finish.

The ingress hands over an admitted request; this module streams it from a model-server
replica and, however the request ends (done, client gone, replica failed), calls the
one `finish` with the usage the client received.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field

from fastapi.responses import JSONResponse, Response
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from deployments.api.claims import ClosingStreamingResponse
from deployments.api.coalesce import coalesced
from deployments.api.errors import OpenAIError, from_engine_error
from deployments.api.responses import SSE_DONE, ResponseBuilder, sse
from deployments.api.seating import Seating, SeatLost, replica_lost
from deployments.config.plan import Tier
from deployments.observability.requests import RequestTimer
from deployments.replicas.requests import GenerateRequest, ServedOutput
from deployments.tenancy.types import UsageRecord, UsageStatus
from models.outputs import CompletionDelta, Usage, merge_outputs

log = logging.getLogger(__name__)
TIER_HEADER = "x-tiered-service-tier"
REPLICA_HEADER = "x-tiered-replica"
Finish = Callable[[UsageRecord | None], Awaitable[None]]
SEND_ATTEMPTS = 3  # a request whose replica is lost before its first token is sent again
RESEND_PAUSE_S = 0.25  # times the attempt number, between attempts


@dataclass
class Served:
    """An admitted request on its way: who, where, and what it has used so far."""

    job: GenerateRequest
    tenant: str
    model: str  # the base model (an adapter is job.lora)
    seating: Seating  # the tier admission chose, and where a lost replica's request goes
    timer: RequestTimer
    finish: Finish
    coalesce_s: float = 0.0  # a streamed step waits this long for the next (coalesce)
    usage: Usage = field(default_factory=Usage)
    closed: bool = False

    @property
    def tier(self) -> Tier:
        assert self.seating.admitted.tier is not None
        return self.seating.admitted.tier

    @property
    def spill(self) -> bool:
        return self.seating.admitted.spill

    def failed(self, exc: BaseException) -> None:
        """The stream failed: a replica that died under it loses its seats now, so the
        next request of a dedicated tenant spills instead of waiting for the replacement."""
        if replica_lost(exc):
            self.seating.lost(exc)

    async def close(self, status: UsageStatus) -> None:
        """Finish the claim once, with the usage the client received."""
        if self.closed:
            return
        self.closed = True
        self.timer.finish(self.usage)
        record = None
        if self.usage.prompt_tokens:
            record = UsageRecord(
                request_id=self.job.request_id,
                tenant=self.tenant,
                model=self.model,
                tier=self.tier,
                spill=self.spill,
                prompt_tokens=self.usage.prompt_tokens,
                cached_tokens=self.usage.cached_tokens,
                completion_tokens=self.usage.completion_tokens,
                started_at=self.seating.started_at,
                ended_at=time.time(),
                status=status,
                adapter=self.job.lora.name if self.job.lora else None,
            )
        await self.finish(record)

    def take(self, served: ServedOutput) -> None:
        self.timer.output()
        self.usage = served.output.usage


def finished(out: ServedOutput) -> bool:
    return out.output.finished


def take_batch(served: Served, batch: list[ServedOutput]) -> list[CompletionDelta]:
    """Coalesced steps as one: the usage so far, one event for the timer, their deltas."""
    served.take(batch[-1])
    return merge_outputs([out.output for out in batch]).deltas


def _stream_outputs(served: Served, handle: DeploymentHandle) -> DeploymentResponseGenerator:
    outputs = handle.options(stream=True).generate.remote(served.job)
    assert isinstance(outputs, DeploymentResponseGenerator)  # stream=True above
    return outputs


async def open_stream(
    served: Served, handle: DeploymentHandle
) -> tuple[DeploymentResponseGenerator, ServedOutput]:
    """Send the request and await its first output, which decides the status.

    A replica lost before that output sent the client nothing, so the request is sent
    again (Serve's router drops a dead replica, and a replica whose engine died retires
    itself), up to SEND_ATTEMPTS times. Any other error before the first output is the
    request's error: closed and mapped to its OpenAI error here."""
    for attempt in range(1, SEND_ATTEMPTS + 1):
        lost = served.seating.watch()
        outputs = _stream_outputs(served, handle)
        try:
            return outputs, await _first_output(outputs, lost)
        except BaseException as exc:
            outputs.cancel()
            if attempt < SEND_ATTEMPTS and (isinstance(exc, SeatLost) or replica_lost(exc)):
                log.warning("replica lost before %s's first token (%s); sending it again",
                            served.job.request_id, type(exc).__name__)
                handle = await _reseat(served, exc)
                await asyncio.sleep(RESEND_PAUSE_S * attempt)
                continue
            served.failed(exc)
            await served.close("error")
            mapped = from_engine_error(exc)
            if mapped is None:
                raise
            raise mapped from None
    raise AssertionError("unreachable: the last attempt returns or raises")


async def _first_output(
    outputs: DeploymentResponseGenerator, lost: asyncio.Event | None
) -> ServedOutput:
    """The first output, or SeatLost when the seat's pool loses a replica first."""
    if lost is None:
        return await outputs.__anext__()
    first = asyncio.ensure_future(outputs.__anext__())
    waiter = asyncio.ensure_future(lost.wait())
    try:
        await asyncio.wait({first, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        if not first.done():
            first.cancel()
    if not first.done() or first.cancelled():
        raise SeatLost
    return first.result()


async def _reseat(served: Served, exc: BaseException) -> DeploymentHandle:
    """Where to send a request again whose replica was lost (a dedicated one may spill)."""
    try:
        await served.seating.reseat(exc)
    except OpenAIError:
        await served.close("error")
        raise
    served.job = served.seating.job(served.job)
    return served.seating.handle


def served_headers(served: Served, first: ServedOutput, headers: dict[str, str]) -> dict[str, str]:
    return {**headers, TIER_HEADER: served.tier, REPLICA_HEADER: first.replica_id}


async def respond(
    served: Served,
    builder: ResponseBuilder,
    handle: DeploymentHandle,
    stream: bool,
    include_usage: bool,
    headers: dict[str, str],
) -> Response:
    """A body, or an SSE stream that closes the claim when it ends."""
    outputs, first = await open_stream(served, handle)
    builder.service_tier = served.tier  # a lost replica's request may have spilled
    headers = served_headers(served, first, headers)
    if stream:
        body = _sse(served, builder, first, outputs, include_usage)
        return ClosingStreamingResponse(body, media_type="text/event-stream", headers=headers)
    status: UsageStatus = "client_disconnect"
    try:
        out = first
        while True:
            served.take(out)
            for delta in out.output.deltas:
                builder.add(delta)
            if out.output.finished:
                break
            out = await outputs.__anext__()
        builder.usage = served.usage
        status = "ok"
    except Exception as exc:
        status = "error"
        served.failed(exc)
        mapped = from_engine_error(exc)
        if mapped is None:
            raise
        raise mapped from None
    finally:
        outputs.cancel()
        await served.close(status)
    return JSONResponse(builder.body(), headers=headers)


async def _sse(
    served: Served,
    builder: ResponseBuilder,
    first: ServedOutput,
    outputs: DeploymentResponseGenerator,
    include_usage: bool,
) -> AsyncIterator[str]:
    started: set[int] = set()
    offsets: dict[int, int] = {}
    status: UsageStatus = "client_disconnect"
    steps = coalesced(first, outputs, served.coalesce_s, finished)
    try:
        async with aclosing(steps) as batches:
            async for batch in batches:
                choices = []
                for delta in take_batch(served, batch):
                    first_of_choice = delta.index not in started
                    offset = offsets.get(delta.index, 0)
                    choices.append(builder.chunk_choice(delta, first_of_choice, offset))
                    started.add(delta.index)
                    offsets[delta.index] = offset + len(delta.text)
                yield builder.chunk(choices, include_usage)
        builder.usage = served.usage
        status = "ok"
        # Finished before the last events go out: a client that has read [DONE] knows
        # its usage is with admission (and on its way to the ledger).
        await served.close(status)
        if include_usage:
            yield builder.usage_chunk()
        yield SSE_DONE
    except Exception as exc:  # the replica failed mid-stream: end with an error event
        status = "error"
        served.failed(exc)
        mapped = from_engine_error(exc)
        if mapped is None:
            log.exception("stream of %s failed", served.job.request_id)
            mapped = OpenAIError(503, "The model server failed.")
        error = {"message": mapped.message, "type": "server_error", "code": mapped.code}
        yield sse({"error": {**error, "param": None}})
    finally:
        outputs.cancel()
        await served.close(status)
