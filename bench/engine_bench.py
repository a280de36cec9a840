"""Engine benchmarks P1 and P2, each row measured side by side in one run.

P1: output tokens/s for 32 concurrent requests (prompts 32-512 tokens, 128 output tokens)
    against HF `generate` run sequentially and statically batched, same model and prompts.
P2: batch-1 decode tokens/s of the `small` model against the memory roofline
    (copy bandwidth measured here, divided by the bytes of weights read per token).

    python -m bench.engine_bench [--p1-size tiny] [--skip-p2] [--out bench/results/engine.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from models.default_model import default_model_path
from models.engine import LLMEngine
from models.engine_config import EngineConfig
from models.sampling_params import SamplingParams


def _prompts(n: int, low: int, high: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(rng.randint(low, high))] for _ in range(n)]


def _engine_throughput(path: Path, prompts: list[list[int]], out_len: int) -> float:
    engine = LLMEngine(
        EngineConfig(model=str(path), max_num_seqs=len(prompts), kv_cache_memory_mb=512)
    )
    params = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    engine.add_request("warm", prompts[0][:8], SamplingParams(max_tokens=2))
    while engine.has_unfinished():
        engine.step()
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    generated, started, prefill_done = 0, set(), None
    while engine.has_unfinished():
        for out in engine.step():
            generated += sum(len(d.token_ids) for d in out.deltas)
            started.add(out.request_id)
        if prefill_done is None and len(started) == len(prompts):
            prefill_done = time.perf_counter() - start
    elapsed = time.perf_counter() - start
    assert generated == len(prompts) * out_len
    return generated / elapsed, (prefill_done or elapsed) / elapsed


def _hf_model(path: Path):  # type: ignore[no-untyped-def]
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.inference_mode()
def _hf_sequential(model, prompts: list[list[int]], out_len: int) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    for p in prompts:
        model.generate(
            torch.tensor([p]),
            max_new_tokens=out_len,
            min_new_tokens=out_len,
            do_sample=False,
            pad_token_id=0,
        )
    return len(prompts) * out_len / (time.perf_counter() - start)


@torch.inference_mode()
def _hf_static_batch(model, prompts: list[list[int]], out_len: int) -> float:  # type: ignore[no-untyped-def]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=out_len,
        min_new_tokens=out_len,
        do_sample=False,
        pad_token_id=0,
    )
    return len(prompts) * out_len / (time.perf_counter() - start)


def run_p1(size: str, n: int, out_len: int) -> dict:
    path = default_model_path(size)
    prompts = _prompts(n, 32, 512, 2000)
    model = _hf_model(path)
    _hf_sequential(model, prompts[:1], 4)  # warm up
    ours, prefill_share = _engine_throughput(path, prompts, out_len)
    static = _hf_static_batch(model, prompts, out_len)
    sequential = _hf_sequential(model, prompts, out_len)
    return {
        "model": size,
        "requests": n,
        "output_tokens": out_len,
        "tiered_tok_s": ours,
        "hf_static_batch_tok_s": static,
        "hf_sequential_tok_s": sequential,
        "ratio_vs_sequential": ours / sequential,
        "ratio_vs_static_batch": ours / static,
        "tiered_prefill_share_of_time": prefill_share,
        "targets": {"ratio_vs_sequential": 8.0, "ratio_vs_static_batch": 1.2},
    }


def measure_copy_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s moved by a large tensor copy (read + write), the best of a few tries."""
    n = int(gib * 2**30 / 4)
    src, dst = torch.ones(n), torch.empty(n)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * n * 4 / best


def run_p2(out_len: int) -> dict:
    path = default_model_path("small")
    engine = LLMEngine(EngineConfig(model=str(path), kv_cache_memory_mb=64))
    model = engine.runner.model
    embed = model.embed_tokens.weight
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p is not embed)
    if model.lm_head is None:  # tied: the embedding is read in full as the lm_head
        weight_bytes += embed.numel() * embed.element_size()
    params = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    engine.add_request("warm", list(range(10, 26)), SamplingParams(max_tokens=4))
    while engine.has_unfinished():
        engine.step()
    engine.add_request("p2", list(range(10, 26)), params)
    engine.step()  # prefill + first token
    start = time.perf_counter()
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    decode_tok_s = steps / (time.perf_counter() - start)
    bandwidth = measure_copy_bandwidth()
    roofline = bandwidth / weight_bytes
    return {
        "model": "small",
        "weight_bytes": weight_bytes,
        "bandwidth_gb_s": bandwidth / 1e9,
        "roofline_tok_s": roofline,
        "decode_tok_s": decode_tok_s,
        "fraction_of_roofline": decode_tok_s / roofline,
        "target": 0.5,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--p1-size", nargs="+", default=["tiny", "small"], choices=["tiny", "small"]
    )
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--skip-p1", action="store_true")
    parser.add_argument("--skip-p2", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench/results/engine.json"))
    args = parser.parse_args()
    result: dict = {
        "machine": f"{platform.machine()} {platform.processor() or ''} "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, CPU",
    }
    console = Console()
    table = Table(title="Tiered engine benchmarks (ratios measured side by side in one run)")
    for col in ("benchmark", "measured", "baseline", "ratio", "target"):
        table.add_column(col)
    for size in [] if args.skip_p1 else args.p1_size:
        p1 = run_p1(size, args.requests, args.output_tokens)
        result[f"p1_{size}"] = p1
        ours = f"{p1['tiered_tok_s']:.0f} tok/s ({p1['tiered_prefill_share_of_time']:.0%} prefill)"
        for baseline, key, target in (
            ("HF sequential", "sequential", ">= 8x"),
            ("HF static batch", "static_batch", ">= 1.2x"),
        ):
            table.add_row(
                f"P1 {size} vs {baseline}",
                ours,
                f"{p1[f'hf_{key}_tok_s']:.0f} tok/s",
                f"{p1[f'ratio_vs_{key}']:.2f}x",
                target,
            )
    if not args.skip_p2:
        p2 = run_p2(args.output_tokens)
        result["p2"] = p2
        table.add_row(
            "P2 batch-1 decode (small)",
            f"{p2['decode_tok_s']:.1f} tok/s",
            f"roofline {p2['roofline_tok_s']:.1f} tok/s ({p2['bandwidth_gb_s']:.1f} GB/s)",
            f"{p2['fraction_of_roofline']:.0%}",
            ">= 50%",
        )
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
