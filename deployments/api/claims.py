"""What an admitted request holds (rate-limit reservation, seat ticket), and its release.

A client that goes away cancels its Serve request, and Ray then cancels that request's
child calls recursively (ray-project/ray#52476): a release sent from the request's own
task context can be dropped before the admission actor runs it, and the seat stays taken
for good. Releases are therefore sent from an empty context, which Ray does not count as
a child of the request, and the streaming body is closed even when the client is gone.
"""

from __future__ import annotations

import asyncio
import contextvars
import uuid
from typing import Any

import anyio
from fastapi.responses import StreamingResponse

from models.outputs import Usage


def remote_outside_request(method: Any, *args: Any) -> Any:
    """`method.remote(*args)`, submitted so that cancelling the request cannot cancel it."""
    return contextvars.Context().run(method.remote, *args)


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that always closes its body generator, disconnects included.

    Starlette just stops iterating when the client goes away, leaving the generator to the
    garbage collector; its `finally` (release the slot, settle the tokens) must not wait
    for that.
    """

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]


class AdmittedRequest:
    """One admitted request's claims, released exactly once, however the request ends."""

    def __init__(self, admission, reservation: int | None) -> None:  # type: ignore[no-untyped-def]
        self.admission = admission
        self.reservation = reservation
        self.ticket = uuid.uuid4().hex
        self.slot_pending = False  # a slot request is in flight at the admission actor
        self.closed = False

    async def close(self, usage: Usage | None = None, record: dict | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        tokens = usage.total_tokens if usage else 0
        call = remote_outside_request(
            self.admission.finish,
            self.ticket,
            self.reservation,
            tokens,
            record,
            not self.slot_pending,
        )
        await asyncio.shield(call)
