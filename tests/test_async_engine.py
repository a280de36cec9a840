"""AsyncLLMEngine: streaming deltas, cancellation frees blocks, errors, health, draining."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from models.async_engine import AsyncLLMEngine
from models.engine_config import EngineConfig
from models.errors import (
    ContextLengthExceededError,
    EngineOverloadedError,
    InvalidRequestError,
)
from models.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def aengine(tiny_model_dir: Path) -> AsyncLLMEngine:
    return AsyncLLMEngine(EngineConfig(model=str(tiny_model_dir), num_kv_blocks=256))


async def _drain(agen) -> list:
    return [out async for out in agen]


def test_stream_yields_deltas_and_usage(aengine: AsyncLLMEngine) -> None:
    async def main() -> list:
        params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
        return await _drain(aengine.generate("s1", "Hello there", params))

    outs = asyncio.run(main())
    assert sum(len(d.token_ids) for o in outs for d in o.deltas) == 10  # may arrive coalesced
    assert outs[-1].finished and outs[-1].deltas[0].finish_reason == "length"
    assert outs[-1].usage.completion_tokens == 10
    assert outs[-1].usage.prompt_tokens == len(aengine.tokenizer.encode("Hello there"))
    assert aengine.stats().kv_blocks_used == 0


def test_cancel_aborts_and_frees_blocks(aengine: AsyncLLMEngine) -> None:
    async def main() -> None:
        params = SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True)
        agen = aengine.generate("c1", list(range(10, 200)), params)
        got = 0
        async for _ in agen:
            got += 1
            if got == 3:
                break
        await agen.aclose()
        for _ in range(100):
            if aengine.stats().kv_blocks_used == 0 and not aengine.engine.has_unfinished():
                return
            await asyncio.sleep(0.05)
        raise AssertionError("blocks still held after cancel")

    asyncio.run(asyncio.wait_for(main(), 30))


def test_concurrent_streams_and_task_cancellation(aengine: AsyncLLMEngine) -> None:
    async def one(i: int) -> list[int]:
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        outs = await _drain(aengine.generate(f"k{i}", [10 + i] * (5 + i), params))
        return [t for o in outs for d in o.deltas for t in d.token_ids]

    async def main() -> list[list[int]]:
        slow = asyncio.create_task(
            _drain(aengine.generate("slow", [5] * 30, SamplingParams(max_tokens=400)))
        )
        results = await asyncio.gather(*(one(i) for i in range(8)))
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        for _ in range(100):
            if aengine.stats().kv_blocks_used == 0:
                break
            await asyncio.sleep(0.05)
        return results

    results = asyncio.run(asyncio.wait_for(main(), 60))
    assert all(len(r) == 8 for r in results)
    assert aengine.stats().kv_blocks_used == 0


def test_bad_input_raises_typed_errors(aengine: AsyncLLMEngine) -> None:
    async def first(prompt, **kw) -> None:
        await _drain(aengine.generate("bad", prompt, SamplingParams(**kw) if kw else None))

    cases = [
        (lambda: SamplingParams(max_tokens=0), "max_tokens"),
        (lambda: SamplingParams(temperature=-0.5), "temperature"),
        (lambda: SamplingParams(top_p=0.0), "top_p"),
        (lambda: SamplingParams(top_p=1.5), "top_p"),
        (lambda: SamplingParams(stop=[1, 2]), "stop"),  # type: ignore[list-item]
        (lambda: SamplingParams(stop=3), "stop"),  # type: ignore[arg-type]
    ]
    for make, param in cases:
        with pytest.raises(InvalidRequestError) as err:
            make()
        assert err.value.param == param
    too_long = [10] * (aengine.engine.max_model_len + 1)
    with pytest.raises(ContextLengthExceededError):
        asyncio.run(first(too_long, max_tokens=1))
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        asyncio.run(first([10**9], max_tokens=1))
    with pytest.raises(InvalidRequestError, match="empty"):
        asyncio.run(first("", max_tokens=1))
    aengine.check_health()


def test_shutdown_drains_then_refuses(tiny_model_dir: Path) -> None:
    eng = AsyncLLMEngine(EngineConfig(model=str(tiny_model_dir), num_kv_blocks=64))

    async def main() -> None:
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        task = asyncio.create_task(_drain(eng.generate("d1", "drain me", params)))
        await asyncio.sleep(0.01)
        await eng.shutdown(drain_timeout_s=20)
        outs = await task
        assert outs[-1].finished
        with pytest.raises(EngineOverloadedError):
            await _drain(eng.generate("d2", "too late", params))

    asyncio.run(asyncio.wait_for(main(), 60))
