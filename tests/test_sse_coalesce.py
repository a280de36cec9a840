"""Streamed steps coalesced by time (deployments.api.coalesce), and the chunk template.

The stream here is a real async generator paced by the clock, as the model server's
steps are; no Ray is needed to show the bound on the added wait and that the text a
client concatenates is the text the engine produced.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

import pytest

from deployments.api.coalesce import coalesced
from deployments.api.responses import ResponseBuilder, sse
from models.outputs import CompletionDelta, RequestOutput, TokenLogprob, Usage, merge_outputs

WINDOW_S = 0.03
SLACK_S = 0.05  # the box's scheduling noise, well under the gaps that tell them apart


async def _paced(gaps_s: list[float]) -> AsyncIterator[tuple[int, float]]:
    """(i, when it was produced) after each gap; the last item is the final one."""
    for i, gap in enumerate(gaps_s):
        await asyncio.sleep(gap)
        yield i, time.monotonic()


def _run(gaps_s: list[float], window_s: float) -> list[tuple[list[tuple[int, float]], float]]:
    """Each batch and when it came out."""
    last = len(gaps_s)  # item 0 is `first`; rest yields 1..len(gaps)

    async def main() -> list[tuple[list[tuple[int, float]], float]]:
        rest = ((i + 1, t) async for i, t in _paced(gaps_s))
        out = []
        steps = coalesced((0, time.monotonic()), rest, window_s, lambda item: item[0] == last)
        async with aclosing(steps) as batches:
            async for batch in batches:
                out.append((batch, time.monotonic()))
        return out

    return asyncio.run(main())


def test_each_step_waits_at_most_the_window_and_the_first_not_at_all() -> None:
    # A burst every 5 ms, a pause longer than the window, another burst, then the end.
    gaps = [0.005] * 12 + [0.25] + [0.005] * 6 + [0.25]
    batches = _run(gaps, WINDOW_S)
    items = [item for batch, _ in batches for item in batch]
    assert [i for i, _ in items] == list(range(len(gaps) + 1))  # all, once, in order
    assert [i for i, _ in batches[0][0]] == [0]
    assert batches[0][1] - batches[0][0][0][1] < SLACK_S  # the first is sent at once
    for batch, sent in batches:
        for _, produced in batch:
            assert sent - produced <= WINDOW_S + SLACK_S
    # The bursts were coalesced: fewer events than steps.
    assert len(batches) < len(items) / 2
    # Nothing waited for the next burst: the pauses split batches.
    assert all(sent - batch[0][1] < 0.25 for batch, sent in batches)
    # The final item ends its batch at once, not after the window.
    final_batch, final_sent = batches[-1]
    assert final_batch[-1][0] == len(gaps) and final_sent - final_batch[-1][1] < SLACK_S


def test_a_slow_stream_is_sent_as_it_comes_without_waiting() -> None:
    window_s = 0.1  # steps 0.15 s apart: nothing to gather, so nothing may wait
    batches = _run([0.15] * 4, window_s)
    assert [[i for i, _ in b] for b, _ in batches] == [[0], [1], [2], [3], [4]]
    assert all(sent - batch[0][1] < window_s / 2 for batch, sent in batches)


def test_a_zero_window_sends_every_step_alone() -> None:
    batches = _run([0.002] * 5, 0.0)
    assert [[i for i, _ in b] for b, _ in batches] == [[0], [1], [2], [3], [4], [5]]


def test_an_error_comes_after_the_steps_read_before_it() -> None:
    async def failing() -> AsyncIterator[int]:
        yield 1
        yield 2
        raise ConnectionError("replica lost")

    async def main() -> list[list[int]]:
        seen: list[list[int]] = []
        async with aclosing(coalesced(0, failing(), 0.05, lambda i: i == 9)) as batches:
            with pytest.raises(ConnectionError):
                async for batch in batches:
                    seen.append(batch)
        return seen

    assert asyncio.run(main()) == [[0], [1, 2]]


def test_a_stream_that_ends_before_its_last_step_is_an_error() -> None:
    async def short() -> AsyncIterator[int]:
        yield 1

    async def main() -> None:
        async with aclosing(coalesced(0, short(), 0.0, lambda i: i == 9)) as batches:
            async for _ in batches:
                pass

    with pytest.raises(EOFError):
        asyncio.run(main())


def _lp(token: str) -> TokenLogprob:
    return TokenLogprob(1, token, -0.5, [(1, token, -0.5)])


def test_merged_deltas_keep_the_text_ids_logprobs_and_finish() -> None:
    steps = [
        [CompletionDelta(0, "Hel", [1], [_lp("Hel")]), CompletionDelta(1, "A", [7], [_lp("A")])],
        [CompletionDelta(0, "lo", [2], [_lp("lo")])],
        [
            CompletionDelta(1, "B", [8], [_lp("B")], "stop"),
            CompletionDelta(0, " é", [3], [_lp(" é")]),
        ],
    ]
    # The engine's own merge (models.outputs), which take_batch uses for coalesced steps.
    merged = merge_outputs([RequestOutput("r", d, False, Usage()) for d in steps]).deltas
    assert [(d.index, d.text, d.token_ids, d.finish_reason) for d in merged] == [
        (0, "Hello é", [1, 2, 3], None),
        (1, "AB", [7, 8], "stop"),
    ]
    assert [lp.token for lp in merged[0].logprobs or []] == ["Hel", "lo", " é"]
    assert steps[0][0].text == "Hel" and steps[0][0].token_ids == [1]  # inputs untouched


@pytest.mark.parametrize("kind", ["chat", "completion"])
@pytest.mark.parametrize("include_usage", [True, False])
def test_the_chunk_template_writes_what_json_dumps_wrote(kind: str, include_usage: bool) -> None:
    b = ResponseBuilder(kind, 'id-"1"', "m/ü", "dedicated", 1)
    for text in ["Hi", 'quote " and \\ back', "line\nbreak \u2028 ü 🙂", ""]:
        choice = b.chunk_choice(CompletionDelta(0, text, [1], [_lp(text)], "stop"), True, 3)
        payload = {**b._header(chunk=True), "choices": [choice]}
        if include_usage:
            payload["usage"] = None
        assert b.chunk([choice], include_usage) == sse(payload)
        json.loads(b.chunk([choice], include_usage).removeprefix("data: "))
