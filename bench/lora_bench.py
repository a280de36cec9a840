"""Multi-LoRA benchmarks (issue 15) on the engine itself, each row measured in one run.

L1: tokens/s of 32 concurrent requests spread round robin over 1, 4, 8 or 16 distinct
    adapters (max_loras 16, every adapter already loaded) against the base model alone.
    Each repeat runs every mix once, in turn, so drift of a shared box hits them alike;
    the ratio to base is taken per repeat (paired), then its percentiles.
L2: adapter load time (LLMEngine.load_lora: read, validate, install), a fresh version
    each time, from files the OS has cached (storage latency is not measured).
L3: latency of a short request whose adapter must first be loaded against one whose
    adapter is resident, alternating, each with a prompt of its own.
L4: the model's forward time of one decode step of 32 sequences (context 96) on the base
    and on 1..16 adapters, every mix once per round in turn, over many rounds: the LoRA
    kernels' own cost, paired step by step, so a shared box's drift cancels better than
    in L1's whole runs.

Adapters are PEFT's own (LoraConfig(init_lora_weights=False), save_pretrained), rank 8 on
every projection, in a temp dir. The prefix cache is off, so repeats recompute their
prompts instead of reusing each other's.

    python -m bench.lora_bench [--size tiny] [--device cpu] [--repeats 5]
                               [--out bench/results/lora.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from rich.console import Console
from rich.table import Table

from models.default_model import Size, default_model_path
from models.engine import LLMEngine
from models.engine_config import EngineConfig
from models.lora import LoRARequest
from models.runner import StepBatch
from models.sampling_params import SamplingParams
from tests.lora_adapters import write_adapter

MAX_LORAS = 16
RANK = 8
_ids = itertools.count()


def percentiles(samples: list[float]) -> dict[str, float]:
    """p10 / p50 / p90 (inclusive deciles: exact at the ends for few samples)."""
    if len(samples) == 1:
        return {"p10": samples[0], "p50": samples[0], "p90": samples[0]}
    deciles = statistics.quantiles(samples, n=10, method="inclusive")
    return {"p10": deciles[0], "p50": deciles[4], "p90": deciles[8]}


def _prompts(n: int, vocab: int, seed: int, low: int = 32, high: int = 128) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(rng.randint(low, high))] for _ in range(n)]


def _drain(engine: LLMEngine) -> int:
    """Step until every request finished; the tokens generated."""
    generated = 0
    while engine.has_unfinished():
        generated += sum(len(d.token_ids) for out in engine.step() for d in out.deltas)
    return generated


def _throughput(
    engine: LLMEngine, prompts: list[list[int]], out_len: int, loras: list[LoRARequest | None]
) -> float:
    params = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"t{next(_ids)}", p, params, lora=loras[i % len(loras)])
    generated = _drain(engine)
    assert generated == len(prompts) * out_len
    return generated / (time.perf_counter() - start)


def run_l1(
    engine: LLMEngine,
    adapters: list[LoRARequest],
    mixes: list[int],
    n: int,
    out_len: int,
    repeats: int,
    vocab: int,
) -> dict:
    prompts = _prompts(n, vocab, seed=0)
    runs: dict[str, list[LoRARequest | None]] = {"base": [None]}
    runs |= {f"{k} adapter{'s' if k > 1 else ''}": list(adapters[:k]) for k in mixes}
    for loras in runs.values():  # warm up: slots filled, kernels compiled
        _throughput(engine, prompts, 2, loras)
    tok_s: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, loras in runs.items():
            tok_s[name].append(_throughput(engine, prompts, out_len, loras))
    out: dict = {"requests": n, "output_tokens": out_len, "repeats": repeats, "runs": {}}
    for name, samples in tok_s.items():
        ratios = [s / b for s, b in zip(samples, tok_s["base"], strict=True)]
        out["runs"][name] = {
            "tok_s": percentiles(samples),
            "ratio_to_base": percentiles(ratios),
            "samples": samples,
        }
    return out


def _decode_batch(engine: LLMEngine, slots: list[int], context: int) -> StepBatch:
    """One decode token per sequence, each over `context` positions of its own blocks."""
    bs = engine.config.block_size
    per_seq = -(-context // bs)
    batch = StepBatch([], [], [], [], [], [], [], [])
    for i in range(len(slots)):
        table = list(range(i * per_seq, (i + 1) * per_seq))
        batch.input_ids.append(10 + i)
        batch.positions.append(context - 1)
        batch.slot_mapping.append(table[(context - 1) // bs] * bs + (context - 1) % bs)
        batch.query_lens.append(1)
        batch.context_lens.append(context)
        batch.block_tables.append(table)
        batch.logits_indices.append(i)
    batch.lora_slots = slots if any(s >= 0 for s in slots) else []
    return batch


def run_l4(
    engine: LLMEngine, adapters: list[LoRARequest], mixes: list[int], n: int, rounds: int
) -> dict:
    """Decode-step forward times; the engine is idle, so its free KV blocks are scratch."""
    assert engine.loras is not None and not engine.has_unfinished()
    for lora in adapters[: max(mixes)]:
        assert engine.loras.acquire_slot(lora.key, set())
    slot = [engine.loras.slot_of(lora.key) for lora in adapters]
    batches = {"base": _decode_batch(engine, [-1] * n, 96)}
    for k in mixes:
        name = f"{k} adapter{'s' if k > 1 else ''}"
        batches[name] = _decode_batch(engine, [slot[i % k] for i in range(n)], 96)
    seconds: dict[str, list[float]] = {name: [] for name in batches}
    for round_ in range(rounds + 5):  # the first 5 warm up
        for name, batch in batches.items():
            start = time.perf_counter()
            engine.runner.execute(batch)
            if round_ >= 5:
                seconds[name].append(time.perf_counter() - start)
    out: dict = {"sequences": n, "rounds": rounds, "runs": {}}
    for name, samples in seconds.items():
        ratios = [b / s for s, b in zip(samples, seconds["base"], strict=True)]
        out["runs"][name] = {"step_s": percentiles(samples), "speed_vs_base": percentiles(ratios)}
    return out


def run_l2(engine: LLMEngine, paths: list[Path], loads: int) -> dict:
    seconds = [
        engine.load_lora(LoRARequest("cold", 1000 + i, str(paths[i % len(paths)])))
        for i in range(loads)
    ]
    assert all(s > 0 for s in seconds), "a fresh version was already held"
    return {"loads": loads, "seconds": percentiles(seconds), "samples": seconds}


def _latency(engine: LLMEngine, prompt: list[int], lora: LoRARequest, out_len: int) -> float:
    """Seconds from add_request (which loads the adapter when it is not held) to the end."""
    params = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    engine.add_request(f"l{next(_ids)}", prompt, params, lora=lora)
    _drain(engine)
    return time.perf_counter() - start


def run_l3(engine: LLMEngine, path: Path, repeats: int, out_len: int, vocab: int) -> dict:
    prompts = _prompts(2 * repeats, vocab, seed=3, low=32, high=32)
    cold, warm = [], []
    for i in range(repeats):
        lora = LoRARequest("latency", 2000 + i, str(path))  # a new version: not held
        cold.append(_latency(engine, prompts[2 * i], lora, out_len))
        warm.append(_latency(engine, prompts[2 * i + 1], lora, out_len))
    return {
        "prompt_tokens": 32,
        "output_tokens": out_len,
        "cold_s": percentiles(cold),
        "resident_s": percentiles(warm),
        "cold_over_resident_p50": statistics.median(cold) / statistics.median(warm),
    }


@dataclass(frozen=True)
class Plan:
    """What one run measures (the command line, checked by argparse)."""

    size: Size
    device: Literal["cpu", "cuda"]
    mixes: list[int]
    requests: int
    output_tokens: int
    repeats: int
    loads: int
    latency_repeats: int
    step_rounds: int


def run(plan: Plan, workdir: Path) -> dict:
    base = default_model_path(plan.size)
    paths = [write_adapter(base, workdir / f"a{i}", seed=i, r=RANK) for i in range(max(plan.mixes))]
    engine = LLMEngine(
        EngineConfig(
            model=str(base),
            device=plan.device,
            max_num_seqs=plan.requests,
            kv_cache_memory_mb=512,
            enable_prefix_caching=False,
            max_loras=MAX_LORAS,
            max_lora_rank=RANK,
        )
    )
    vocab = engine.model_config.vocab_size
    adapters = [LoRARequest(f"a{i}", 1, str(p)) for i, p in enumerate(paths)]
    for lora in adapters:
        engine.load_lora(lora)
    n, out_len = plan.requests, plan.output_tokens
    return {
        "model": plan.size,
        "device": plan.device,
        "max_loras": MAX_LORAS,
        "rank": RANK,
        "l1_throughput": run_l1(engine, adapters, plan.mixes, n, out_len, plan.repeats, vocab),
        "l4_decode_step": run_l4(engine, adapters, plan.mixes, n, plan.step_rounds),
        "l2_load": run_l2(engine, paths, plan.loads),
        "l3_latency": run_l3(engine, paths[0], plan.latency_repeats, 8, vocab),
    }


def table(result: dict) -> Table:
    l1, l2, l3 = result["l1_throughput"], result["l2_load"], result["l3_latency"]
    l4 = result["l4_decode_step"]
    t = Table(
        title=f"Tiered multi-LoRA on the engine ({result['model']}, rank {result['rank']}, "
        f"max_loras {result['max_loras']}; {l1['requests']} concurrent requests x "
        f"{l1['output_tokens']} tokens, {l1['repeats']} repeats; one run, {result['machine']})"
    )
    for col in ("figure", "p10", "p50", "p90", "ratio p50 (p10..p90)"):
        t.add_column(col)

    def row(label: str, p: dict[str, float], scale: float, fmt: str, ratio: str) -> None:
        t.add_row(label, *(f"{p[k] * scale:{fmt}}" for k in ("p10", "p50", "p90")), ratio)

    for name, run_ in l1["runs"].items():
        r = run_["ratio_to_base"]
        ratio = f"{r['p50']:.2f}x ({r['p10']:.2f}..{r['p90']:.2f}) of base"
        row(f"L1 tok/s, {name}", run_["tok_s"], 1, ".0f", ratio)
    for name, run_ in l4["runs"].items():
        r = run_["speed_vs_base"]
        ratio = f"{r['p50']:.2f}x ({r['p10']:.2f}..{r['p90']:.2f}) of base speed"
        row(f"L4 decode step ms, {name}", run_["step_s"], 1000, ".2f", ratio)
    row(f"L2 adapter load ms ({l2['loads']} loads)", l2["seconds"], 1000, ".1f", "")
    row("L3 latency ms, adapter resident", l3["resident_s"], 1000, ".1f", "")
    ratio = f"{l3['cold_over_resident_p50']:.2f}x of resident"
    row("L3 latency ms, adapter loaded first", l3["cold_s"], 1000, ".1f", ratio)
    return t


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--mixes", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loads", type=int, default=20)
    parser.add_argument("--latency-repeats", type=int, default=10)
    parser.add_argument("--step-rounds", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("bench/results/lora.json"))
    args = parser.parse_args(argv)
    if max(args.mixes) > MAX_LORAS:
        parser.error(f"--mixes: at most {MAX_LORAS} adapters (max_loras)")
    with tempfile.TemporaryDirectory(prefix="tiered-lora-bench-") as workdir:
        plan = Plan(
            args.size,
            args.device,
            args.mixes,
            args.requests,
            args.output_tokens,
            args.repeats,
            args.loads,
            args.latency_repeats,
            args.step_rounds,
        )
        result = run(plan, Path(workdir))
    result["machine"] = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"{platform.machine()} {torch.get_num_threads()} threads"
    ) + f", torch {torch.__version__}"
    console = Console(width=140)
    console.print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
