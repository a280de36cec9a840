"""Model-server replica figures (issue 3), measured side by side in one run on local Ray.

- cold start of one replica, TP=1 and TP=2 (placement group, ranks, weights, KV cache);
- per-step time of a batch-1 decode through each, and the step fan-out cost;
- tokens/s of one replica through a DeploymentHandle against the in-process engine;
- the step fan-out alone: rank 0's two broadcasts of a batch-1 decode step's inputs over a
  bare 2-process gloo group, against one all-reduce of a hidden-state row, to split the
  TP=2 overhead into the fan-out and the model's own collectives.

    python -m bench.replica_bench [--out bench/results/replica.json]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import socket
import statistics
import time
from dataclasses import replace
from pathlib import Path

import ray
from ray import serve

from bench.report import emit
from deployments.config.models import ModelSpec, ReplicaSpec
from deployments.replicas.model_server import model_server_app
from deployments.replicas.requests import GenerateRequest
from models.default_model import default_model_path
from models.engine import LLMEngine
from models.sampling_params import SamplingParams

FANOUT_ITERS = 500
FANOUT_ROUNDS = 7
HIDDEN = 256  # the tiny model's hidden size
LOAD = [[10 + (i * 7 + j) % 1900 for j in range(24 + i % 16)] for i in range(16)]
LOAD_TOKENS = 48


async def _stream_times(handle, request: GenerateRequest) -> list[tuple[float, int]]:
    """(arrival time, tokens) per message: a message may carry several steps' tokens."""
    stamps = []
    async for served in handle.options(stream=True).generate.remote(request):
        tokens = sum(len(d.token_ids) for d in served.output.deltas)
        stamps.append((time.perf_counter(), tokens))
    return stamps


def _ms_per_token(stamps: list[tuple[float, int]]) -> float:
    """Decode time per token after the first message (which carries the prefill)."""
    tokens_after_first = sum(n for _, n in stamps[1:])
    return (stamps[-1][0] - stamps[0][0]) / tokens_after_first * 1000


async def _through_handle(handle) -> float:
    params = SamplingParams(max_tokens=LOAD_TOKENS, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    await asyncio.gather(
        *(
            _stream_times(handle, GenerateRequest(f"l{i}-{start}", p, params))
            for i, p in enumerate(LOAD)
        )
    )
    return len(LOAD) * LOAD_TOKENS / (time.perf_counter() - start)


def _in_process(spec: ModelSpec, replica: ReplicaSpec, model_dir: str) -> float:
    engine = LLMEngine(spec.engine_config(replica, 0, model_dir))
    params = SamplingParams(max_tokens=LOAD_TOKENS, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    for i, p in enumerate(LOAD):
        engine.add_request(f"l{i}", p, params)
    while engine.has_unfinished():
        engine.step()
    return len(LOAD) * LOAD_TOKENS / (time.perf_counter() - start)


def _fanout_rank(rank: int, address: str, out: mp.Queue) -> None:
    """One rank of the fan-out micro-benchmark (a spawned process)."""
    import torch
    import torch.distributed as dist

    from models.runner import StepBatch, payload_length
    from models.tp import broadcast_ints, init_parallel

    torch.set_num_threads(1)
    ctx = init_parallel(rank, 2, address, "cpu")
    batch = StepBatch([5], [40], [40], [1], [41], [[0, 1, 2]], [0])  # one decode step
    header, payload = batch.pack()
    row = torch.zeros(1, HIDDEN)

    def timed(with_fanout: bool) -> float:
        dist.barrier()
        start = time.perf_counter()
        for _ in range(FANOUT_ITERS):
            if with_fanout:
                # exactly what ModelRunner.execute / serve_forever do per step
                got = broadcast_ints(header if rank == 0 else None, ctx, len(header)).tolist()
                broadcast_ints(payload if rank == 0 else None, ctx, payload_length(got))
            dist.all_reduce(row)  # every step ends in collectives; this one closes the loop
        return (time.perf_counter() - start) / FANOUT_ITERS * 1000

    timed(True)  # warm up
    rounds = [(timed(False), timed(True)) for _ in range(FANOUT_ROUNDS)]  # interleaved
    if rank == 0:
        base = statistics.median(b for b, _ in rounds)
        fan = statistics.median(f - b for b, f in rounds)
        out.put({"allreduce_ms": base, "fanout_ms": fan})
    dist.destroy_process_group()


def fanout_micro() -> dict[str, float]:
    """Per-step cost of the step fan-out and of one all-reduce, on a bare gloo pair."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    ranks = [ctx.Process(target=_fanout_rank, args=(r, address, out)) for r in (0, 1)]
    for proc in ranks:
        proc.start()
    result = out.get(timeout=300)
    for proc in ranks:
        proc.join(60)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/replica.json"))
    args = parser.parse_args()
    model_dir = str(default_model_path("tiny"))
    spec = ModelSpec(name="tiny", path=model_dir, engine={"num_kv_blocks": 512})
    ray.init(address="local", num_cpus=8, include_dashboard=False)  # never join another
    serve.start()
    result: dict = {
        "machine": "2-core CPU box (gloo)",
        "model": "tiny",
        "load_avg_1m_at_start": os.getloadavg()[0],
    }
    handles = {}
    for tp in (1, 2):
        replica = ReplicaSpec(tp_size=tp)
        start = time.perf_counter()
        handles[tp] = serve.run(
            model_server_app(spec, replica, f"tp{tp}"), name=f"tp{tp}", route_prefix=None
        )
        result[f"cold_start_tp{tp}_s"] = time.perf_counter() - start
        result[f"replica_init_tp{tp}_s"] = handles[tp].stats.remote().result()["cold_start_s"]
    for tp in (1, 2):
        params = SamplingParams(max_tokens=65, temperature=0.0, ignore_eos=True)
        request = GenerateRequest(f"step{tp}", [5, 6, 7, 8], params)
        asyncio.run(_stream_times(handles[tp], replace(request, request_id=f"warm{tp}")))
        stamps = asyncio.run(_stream_times(handles[tp], request))
        result[f"decode_step_tp{tp}_ms"] = _ms_per_token(stamps)
    result["tp2_step_overhead_ms"] = result["decode_step_tp2_ms"] - result["decode_step_tp1_ms"]
    result["tp2_vs_tp1_step"] = result["decode_step_tp2_ms"] / result["decode_step_tp1_ms"]
    result["handle_tok_s"] = asyncio.run(_through_handle(handles[1]))
    result["in_process_tok_s"] = _in_process(spec, ReplicaSpec(tp_size=1), model_dir)
    result["handle_vs_in_process"] = result["handle_tok_s"] / result["in_process_tok_s"]
    serve.shutdown()
    ray.shutdown()
    micro = fanout_micro()
    result["fanout_2_broadcasts_ms"] = micro["fanout_ms"]
    result["gloo_allreduce_1x256_ms"] = micro["allreduce_ms"]

    emit("Model-server replicas (one run, local Ray, CPU)", result, args.out)


if __name__ == "__main__":
    main()
