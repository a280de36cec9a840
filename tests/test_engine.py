"""LLMEngine behaviour: HF parity, batching invariance, preemption, prefix cache, abort."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from models.block_pool import BlockPool
from models.engine import LLMEngine
from models.engine_config import EngineConfig
from models.sampling_params import SamplingParams
from tests.engine_helpers import collect, generate, run_to_completion

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(tiny_model_dir), num_kv_blocks=512, max_num_seqs=64))


@pytest.fixture(autouse=True)
def _idle_engine_holds_no_blocks(request):
    yield
    if "engine" in request.fixturenames:
        eng = request.getfixturevalue("engine")
        assert not eng.has_unfinished()
        assert eng.kv.num_used_blocks == 0


def _prompts(n: int, vocab: int, seed: int = 0, low: int = 3, high: int = 90) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(rng.randint(low, high))] for _ in range(n)]


GREEDY = dict(temperature=0.0, ignore_eos=True)


def test_greedy_matches_hf_generate(engine: LLMEngine, tiny_model_dir: Path) -> None:
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    hf.eval()
    for prompt in _prompts(3, 2000, seed=1, low=5, high=60):
        ours = generate(engine, prompt, SamplingParams(max_tokens=32, **GREEDY))
        with torch.no_grad():
            want = hf.generate(
                torch.tensor([prompt]),
                max_new_tokens=32,
                min_new_tokens=32,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )[0, len(prompt) :].tolist()
        assert ours["tokens"][0] == want


def _assert_batched_equals_solo(
    engine: LLMEngine, prompts: list[list[int]], params: SamplingParams
) -> None:
    solo = [generate(engine, p, params)["tokens"][0] for p in prompts]
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    batched = collect(run_to_completion(engine))
    assert [batched[f"r{i}"]["tokens"][0] for i in range(len(prompts))] == solo


def test_concurrent_requests_equal_their_solo_runs(engine: LLMEngine) -> None:
    prompts = _prompts(32, 2000, seed=2, low=3, high=120)
    _assert_batched_equals_solo(engine, prompts, SamplingParams(max_tokens=12, **GREEDY))


def test_preemption_under_a_small_kv_budget_keeps_outputs(tiny_model_dir: Path) -> None:
    small = LLMEngine(
        EngineConfig(
            model=str(tiny_model_dir),
            num_kv_blocks=24,
            block_size=16,
            max_num_seqs=32,
            enable_prefix_caching=False,
        )
    )
    prompts = _prompts(32, 2000, seed=3, low=20, high=100)
    _assert_batched_equals_solo(small, prompts, SamplingParams(max_tokens=24, **GREEDY))
    assert small.stats().num_preemptions > 0
    assert small.kv.num_used_blocks == 0


def test_chunked_prefill_equals_one_shot(tiny_model_dir: Path, engine: LLMEngine) -> None:
    chunked = LLMEngine(
        EngineConfig(model=str(tiny_model_dir), num_kv_blocks=128, max_num_batched_tokens=32)
    )
    prompt = _prompts(1, 2000, seed=4, low=150, high=150)[0]
    params = SamplingParams(max_tokens=8, **GREEDY)
    assert generate(chunked, prompt, params)["tokens"] == generate(engine, prompt, params)["tokens"]


def test_abort_frees_every_block(engine: LLMEngine) -> None:
    for i, p in enumerate(_prompts(6, 2000, seed=5, low=40, high=80)):
        engine.add_request(f"a{i}", p, SamplingParams(max_tokens=50, **GREEDY))
    for _ in range(3):
        engine.step()
    assert engine.kv.num_used_blocks > 0
    for i in range(6):
        engine.abort(f"a{i}")
    assert engine.kv.num_used_blocks == 0
    assert not engine.has_unfinished()


def test_prefix_cache_hit_is_identical_and_salted(engine: LLMEngine) -> None:
    prompt = _prompts(1, 2000, seed=6, low=70, high=70)[0]
    params = SamplingParams(max_tokens=10, **GREEDY)
    cold = generate(engine, prompt, params, cache_salt="tenant-a")
    warm = generate(engine, prompt, params, cache_salt="tenant-a")
    other = generate(engine, prompt, params, cache_salt="tenant-b")
    assert cold["usage"].cached_tokens == 0
    assert warm["usage"].cached_tokens == 64  # four full blocks of 16; the last token recomputes
    assert other["usage"].cached_tokens == 0
    assert warm["tokens"] == cold["tokens"] == other["tokens"]
    assert engine.stats().prefix_hit_rate > 0


def test_n_samples_share_prompt_blocks(engine: LLMEngine) -> None:
    prompt = _prompts(1, 2000, seed=7, low=48, high=48)[0]
    engine.add_request("multi", prompt, SamplingParams(max_tokens=6, n=3, temperature=1.0, seed=11))
    for _ in range(4):
        engine.step()
    tables = [engine.kv.block_table(s) for s in engine._requests["multi"].seqs]
    assert tables[0][:2] == tables[1][:2] == tables[2][:2]  # the 32 shared prompt tokens
    out = collect(run_to_completion(engine))["multi"]
    assert sorted(out["tokens"]) == [0, 1, 2]
    assert out["usage"].completion_tokens == 18
    assert len({tuple(t) for t in out["tokens"].values()}) > 1


def test_seeds_reproduce_and_top_k_1_is_greedy(engine: LLMEngine) -> None:
    prompt = _prompts(1, 2000, seed=8)[0]
    sampled = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    first = generate(engine, prompt, sampled)["tokens"]
    # Reproduces even when batched with other traffic.
    engine.add_request("noise", _prompts(1, 2000, seed=9)[0], SamplingParams(max_tokens=20))
    again = generate(engine, prompt, sampled)["tokens"]
    assert first == again
    other = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=99, ignore_eos=True)
    assert generate(engine, prompt, other)["tokens"] != first
    greedy = generate(engine, prompt, SamplingParams(max_tokens=16, **GREEDY))["tokens"]
    top1 = SamplingParams(max_tokens=16, temperature=0.8, top_k=1, seed=5, ignore_eos=True)
    assert generate(engine, prompt, top1)["tokens"] == greedy


def test_stop_string_is_trimmed(engine: LLMEngine) -> None:
    prompt = "The scheduler hands out a token budget"
    full = generate(engine, prompt, SamplingParams(max_tokens=40, **GREEDY))
    text = full["text"][0]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), "greedy text too short to pick a stop string"
    cut = generate(engine, prompt, SamplingParams(max_tokens=40, stop=[stop], **GREEDY))
    assert cut["finish"][0] == "stop"
    assert cut["text"][0] == text[: text.index(stop)]
    assert full["finish"][0] == "length"


def test_streamed_text_is_valid_utf8(engine: LLMEngine) -> None:
    """Deltas never split a character: joined, they equal one decode of all the tokens."""
    engine.add_request(
        "u", "héllo wörld ✓ 日本語 🚀", SamplingParams(max_tokens=64, temperature=1.2, seed=3)
    )
    outs = run_to_completion(engine)
    pieces = [d.text for out in outs for d in out.deltas]
    tokens = [t for out in outs for d in out.deltas for t in d.token_ids]
    for piece in pieces:
        piece.encode("utf-8")  # raises on lone surrogates
    eos = engine.eos_token_ids
    assert "".join(pieces) == engine.tokenizer.decode([t for t in tokens if t not in eos])


def test_logprobs_and_penalties(engine: LLMEngine) -> None:
    prompt = _prompts(1, 2000, seed=10)[0]
    out = generate(engine, prompt, SamplingParams(max_tokens=4, logprobs=3, **GREEDY))
    assert out["usage"].completion_tokens == 4
    engine.add_request("lp", prompt, SamplingParams(max_tokens=1, logprobs=5, **GREEDY))
    (step,) = run_to_completion(engine)
    lp = step.deltas[0].logprobs[0]
    assert len(lp.top) == 5
    assert lp.token_id == lp.top[0][0] and abs(lp.logprob - lp.top[0][2]) < 1e-6
    assert [t[2] for t in lp.top] == sorted((t[2] for t in lp.top), reverse=True)
    plain = generate(engine, prompt, SamplingParams(max_tokens=40, **GREEDY))["tokens"][0]
    # The random model rarely repeats itself, so test the sign the other way round:
    # negative penalties reward tokens already generated, and the output collapses.
    rewarded = SamplingParams(
        max_tokens=40, frequency_penalty=-2.0, presence_penalty=-2.0, **GREEDY
    )
    repeated = generate(engine, prompt, rewarded)["tokens"][0]
    assert len(set(repeated)) < len(set(plain)) // 2


def test_priority_goes_first_when_seats_are_scarce(tiny_model_dir: Path) -> None:
    one_seat = LLMEngine(EngineConfig(model=str(tiny_model_dir), num_kv_blocks=64, max_num_seqs=1))
    params = SamplingParams(max_tokens=3, **GREEDY)
    one_seat.add_request("low", [11, 12, 13], params, priority=0)
    one_seat.add_request("high", [21, 22, 23], params, priority=5)
    finished = [o.request_id for o in run_to_completion(one_seat) if o.finished]
    assert finished == ["high", "low"]


def test_stop_token_ids_end_the_sample(engine: LLMEngine) -> None:
    prompt = _prompts(1, 2000, seed=12)[0]
    tokens = generate(engine, prompt, SamplingParams(max_tokens=10, **GREEDY))["tokens"][0]
    stop_at = tokens[3]
    cut = generate(
        engine, prompt, SamplingParams(max_tokens=10, stop_token_ids=[stop_at], **GREEDY)
    )
    assert cut["tokens"][0] == tokens[: tokens.index(stop_at) + 1]
    assert cut["finish"][0] == "stop"


def test_lru_eviction_forgets_the_least_recently_freed_block() -> None:
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    pool.register(a, b"hash-a")
    pool.register(b, b"hash-b")
    pool.release([a])  # a freed first, then b: a is the least recently used
    pool.release([b])
    taken = pool.allocate(3)  # two never-used blocks, then the LRU cached one
    assert a in taken and pool.lookup(b"hash-a") is None
    assert pool.lookup(b"hash-b") is b and b.ref_cnt == 0
    pool.touch([b])  # a hit revives b from the free queue
    assert b.ref_cnt == 1 and pool.num_free == 0


def test_merge_outputs_keeps_every_token_and_the_last_usage() -> None:
    from models.outputs import CompletionDelta, RequestOutput, Usage, merge_outputs

    a = RequestOutput(
        "r", [CompletionDelta(0, "he", [1]), CompletionDelta(1, "x", [9])], False, Usage(3, 2)
    )
    b = RequestOutput(
        "r", [CompletionDelta(0, "llo", [2], finish_reason="stop")], True, Usage(3, 3)
    )
    m = merge_outputs([a, b])
    assert m.finished and m.usage.completion_tokens == 3
    assert [(d.index, d.text, d.token_ids, d.finish_reason) for d in m.deltas] == [
        (0, "hello", [1, 2], "stop"),
        (1, "x", [9], None),
    ]


@pytest.mark.parametrize("retain", [True, False])
def test_a_retained_prefix_outlives_a_stream_of_ordinary_requests(
    tiny_model_dir: Path, retain: bool
) -> None:
    """24 blocks of 16: the conversation's 5 blocks, then 8 one-off requests of 5 blocks
    each, one at a time. Plain LRU evicts the conversation (freed first); retained, it is
    evicted only once no ordinary free block is left, which never happens here."""
    small = LLMEngine(EngineConfig(model=str(tiny_model_dir), num_kv_blocks=24, block_size=16))
    conversation, *others = _prompts(9, 2000, seed=13, low=70, high=70)
    params = SamplingParams(max_tokens=4, **GREEDY)
    first = generate(small, conversation, params, retain=retain)
    assert first["usage"].cached_tokens == 0
    for i, prompt in enumerate(others):
        small.add_request(f"once{i}", prompt, params)
        run_to_completion(small)
    assert small.kv.num_used_blocks == 0
    again = generate(small, conversation, params)
    assert again["usage"].cached_tokens == (64 if retain else 0)
    assert again["tokens"] == first["tokens"]
