"""A streaming body that is always closed, so an admitted request's claim is always
finished: the client going away included (the finish itself is sent from an empty task
context, see deployments.tenancy.client)."""

from __future__ import annotations

import anyio
from fastapi.responses import StreamingResponse


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that always closes its body generator, disconnects included.

    Starlette just stops iterating when the client goes away, leaving the generator to the
    garbage collector; its `finally` (release the slot, settle the tokens) must not wait
    for that.
    """

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
