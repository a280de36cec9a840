"""Engine steps gathered into one SSE event each few milliseconds, not one per token.

Every event the ingress writes costs an ASGI send, a trip through the proxy and a client
read; under load the engine's steps reach the ingress faster than it writes them out. So
after the first output (sent at once: time to first token is never delayed), an output
that came on the heels of the one before (within the window) waits at most `window_s`
for the ones that follow it, and they go out as one event with the same text. A slow
stream's outputs go out one by one as they come, and a finished output ends its batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import TypeVar

T = TypeVar("T")


async def coalesced(
    first: T, rest: AsyncIterator[T], window_s: float, last: Callable[[T], bool]
) -> AsyncGenerator[list[T], None]:
    """[first], then batches of `rest`: each item waits at most `window_s` after it
    arrived, and a batch ends at an item for which `last` is true (nothing is read after
    it). An item that came more than `window_s` after the one before is sent alone at once
    (a slow stream has nothing to gather, so it pays no wait and no timer). An error from
    `rest` comes after the batch read before it; `rest` ending before its last item is an
    EOFError. Close the iterator (contextlib.aclosing) so that a read in flight is
    cancelled."""
    yield [first]
    if last(first):
        return
    loop = asyncio.get_running_loop()
    previous = loop.time()
    pending: asyncio.Future[T] | None = None
    try:
        while True:
            try:  # an error from `rest` is raised here
                item = await (pending if pending is not None else anext(rest))
            except StopAsyncIteration:
                raise EOFError("the stream ended before its last output") from None
            pending = None
            now = loop.time()
            batch, fast = [item], now - previous < window_s
            previous = now
            deadline = now + window_s
            while fast and not last(batch[-1]) and (left := deadline - loop.time()) > 0:
                pending = asyncio.ensure_future(anext(rest))
                done, _ = await asyncio.wait({pending}, timeout=left)
                if not done or pending.exception() is not None:
                    break  # not here in time, or failed: raised at the next read
                batch.append(pending.result())
                pending = None
                previous = loop.time()
            yield batch
            if last(batch[-1]):
                return
    finally:
        if pending is not None:
            pending.cancel()
