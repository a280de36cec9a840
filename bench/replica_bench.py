"""Model-server replica figures (issue 3), measured side by side in one run on local Ray.

- cold start of one replica, TP=1 and TP=2 (placement group, ranks, weights, KV cache);
- per-step time of a batch-1 decode through each, and the step fan-out cost;
- tokens/s of one replica through a DeploymentHandle against the in-process engine.

    python -m bench.replica_bench [--out bench/results/replica.json]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import ray
from ray import serve

from bench.report import emit
from deployments.model_server import model_server_app
from deployments.serving_config import ModelSpec, ReplicaSpec
from models.default_model import default_model_path
from models.engine import LLMEngine
from models.sampling_params import SamplingParams

LOAD = [[10 + (i * 7 + j) % 1900 for j in range(24 + i % 16)] for i in range(16)]
LOAD_TOKENS = 48


async def _stream_times(handle, request: dict) -> list[float]:
    stamps = []
    async for _ in handle.options(stream=True).generate.remote(request):
        stamps.append(time.perf_counter())
    return stamps


async def _through_handle(handle) -> float:
    params = {"max_tokens": LOAD_TOKENS, "temperature": 0.0, "ignore_eos": True}
    start = time.perf_counter()
    await asyncio.gather(
        *(
            _stream_times(handle, {"request_id": f"l{i}-{start}", "prompt": p, "params": params})
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/replica.json"))
    args = parser.parse_args()
    model_dir = str(default_model_path("tiny"))
    spec = ModelSpec(name="tiny", path=model_dir, engine={"num_kv_blocks": 512})
    ray.init(num_cpus=8, include_dashboard=False)
    serve.start()
    result: dict = {"machine": "2-core CPU box (gloo)", "model": "tiny"}
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
        request = {
            "request_id": f"step{tp}",
            "prompt": [5, 6, 7, 8],
            "params": {"max_tokens": 65, "temperature": 0.0, "ignore_eos": True},
        }
        asyncio.run(_stream_times(handles[tp], {**request, "request_id": f"warm{tp}"}))
        stamps = asyncio.run(_stream_times(handles[tp], request))
        result[f"decode_step_tp{tp}_ms"] = (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1000
    result["tp2_step_overhead_ms"] = result["decode_step_tp2_ms"] - result["decode_step_tp1_ms"]
    result["handle_tok_s"] = asyncio.run(_through_handle(handles[1]))
    result["in_process_tok_s"] = _in_process(spec, ReplicaSpec(tp_size=1), model_dir)
    result["handle_vs_in_process"] = result["handle_tok_s"] / result["in_process_tok_s"]
    serve.shutdown()
    ray.shutdown()

    emit("Model-server replicas (one run, local Ray, CPU)", result, args.out)


if __name__ == "__main__":
    main()
