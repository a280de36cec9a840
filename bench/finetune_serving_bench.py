"""Fine-tuning beside serving (issue 19), on one local Ray instance with real Serve and HTTP:

F1: the time from a job's `succeeded` (the first poll of `GET /v1/fine_tuning/jobs/{id}`
    that reads it, polled every 50 ms) to the first streamed token of its `ft:` model
    (`POST /v1/chat/completions`, the replica loading the adapter on that request),
    for several short jobs one after another; each, and the median.
F2: the shared pool's TTFT (streamed, 8 tokens out, one request at a time from the
    official SDK) idle, then while a long job trains beside it, then idle again as a
    control; side by side in one run, the same requests in each phase. The training phase
    starts once the job has trained its first steps, and the job is checked to be
    running at its end. The goal: flooded / idle p99 <= 1.25x.

    python -m bench.finetune_serving_bench [--jobs 3] [--requests 300] [--no-control]
                                           [--out bench/results/finetune_serving.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Literal, cast

import openai
import ray
from openai.types.chat import ChatCompletionMessageParam
from ray import serve

from bench.admission_bench import free_port
from bench.metrics import percentile
from bench.report import emit
from deployments.app import build_from_config
from deployments.config.tiered import TieredConfig
from deployments.tenancy.keys import hash_key
from models.default_model import default_model_path, make_default

APP = "ftbench"
MODEL: Literal["tiny"] = "tiny"
KEY = "tk-ftbench"
REPLY = "The lighthouse keeper sleeps at noon."
POLL_S = 0.05
DEADLINE_S = 300.0
PROMPT: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Tell me about lighthouses and their keepers."}
]


def config(model_dir: Path, state: Path) -> TieredConfig:
    """Defaults but for the paths: one shared-pool replica of the tiny model, one training
    task of 1 CPU at a time."""
    return TieredConfig.model_validate(
        {
            "models": [{"name": MODEL, "path": str(model_dir),
                        "engine": {"max_loras": 4}, "shared_pool": {"num_replicas": 1}}],
            "tenants": [{"name": "acme", "api_key_hashes": [hash_key(KEY)]}],
            "ingress": {"num_replicas": 1},
            "state": {"url": f"sqlite+aiosqlite:///{state / 'ft.db'}"},
            "files": {"root": str(state / "files")},
            "fine_tuning": {"base_learning_rate": 1e-3, "poll_interval_s": 0.2},
        }
    )  # fmt: skip


def training_file(c: openai.OpenAI, n: int) -> str:
    lines = [
        {"messages": [{"role": "user", "content": f"Question {i}?"},
                      {"role": "assistant", "content": REPLY}]}
        for i in range(n)
    ]  # fmt: skip
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    return c.files.create(file=("train.jsonl", data), purpose="fine-tune").id


def until(what: str, check: Any, every_s: float = POLL_S) -> Any:
    deadline = time.monotonic() + DEADLINE_S
    while not (value := check()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {DEADLINE_S}s")
        time.sleep(every_s)
    return value


def ttft(c: openai.OpenAI, model: str) -> float:
    """Seconds to the first streamed content token."""
    start = time.perf_counter()
    with c.chat.completions.create(
        model=model, messages=PROMPT, max_tokens=8, temperature=0, stream=True
    ) as stream:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                return time.perf_counter() - start
    raise RuntimeError(f"{model}: the stream ended without a token")


def succeeded_to_first_token(c: openai.OpenAI, file_id: str) -> dict[str, Any]:
    job = c.fine_tuning.jobs.create(
        model=MODEL, training_file=file_id, hyperparameters={"n_epochs": 2, "batch_size": 4}
    )

    def done() -> Any:
        got = c.fine_tuning.jobs.retrieve(job.id)
        if got.status in ("failed", "cancelled"):
            raise RuntimeError(f"job {job.id} {got.status}: {got.error}")
        return got if got.status == "succeeded" else None

    ended = until(f"job {job.id}", done)
    seen = time.perf_counter()
    first = ttft(c, ended.fine_tuned_model)
    return {"job": job.id, "seconds": time.perf_counter() - seen, "ttft": first}


def phase(c: openai.OpenAI, n: int) -> list[float]:
    return [ttft(c, MODEL) for _ in range(n)]


def steps(c: openai.OpenAI, job_id: str) -> int:
    events = c.fine_tuning.jobs.list_events(job_id, limit=10)  # newest first
    metrics = [cast(dict[str, Any], e.data) for e in events if e.type == "metrics" and e.data]
    return int(metrics[0]["step"]) if metrics else 0


def serving_beside_training(c: openai.OpenAI, n: int, control: bool) -> dict[str, Any]:
    file_id = training_file(c, 256)
    for _ in range(10):  # warm-up: the replica's first requests
        ttft(c, MODEL)
    idle = phase(c, n)
    job = c.fine_tuning.jobs.create(
        model=MODEL, training_file=file_id, hyperparameters={"n_epochs": 50, "batch_size": 1}
    )  # 12800 steps: it outlasts the phase, then is cancelled
    until("the job's first steps", lambda: steps(c, job.id) >= 3, every_s=0.2)
    first = steps(c, job.id)
    started = time.perf_counter()
    training = phase(c, n)
    took = time.perf_counter() - started
    trained = steps(c, job.id) - first
    still = c.fine_tuning.jobs.retrieve(job.id).status
    c.fine_tuning.jobs.cancel(job.id)
    until("the cancel", lambda: any(
        e.message == "The job was cancelled" for e in c.fine_tuning.jobs.list_events(job.id)
    ), every_s=0.2)  # fmt: skip
    return {"idle": idle, "training": training, "control": phase(c, n) if control else [],
            "training_steps_in_phase": trained, "training_phase_s": took,
            "job_status_at_phase_end": still}  # fmt: skip


def figures(f1: list[dict[str, Any]], f2: dict[str, Any]) -> dict[str, Any]:
    ms = {k: [1000 * s for s in f2[k]] for k in ("idle", "training", "control") if f2[k]}
    out: dict[str, Any] = {
        "F1 succeeded -> first token, each (s)": [round(j["seconds"], 3) for j in f1],
        "F1 succeeded -> first token, median (s)": statistics.median(j["seconds"] for j in f1),
        "F1 first request's TTFT, median (s)": statistics.median(j["ttft"] for j in f1),
    }
    for k, values in ms.items():
        out[f"F2 {k}: n"] = len(values)
        for q in (50, 90, 99):
            out[f"F2 {k}: TTFT p{q} (ms)"] = percentile(values, q)
    for q in (50, 99):
        out[f"F2 training / idle, p{q}"] = percentile(ms["training"], q) / percentile(ms["idle"], q)
        if "control" in ms:
            out[f"F2 control / idle, p{q}"] = percentile(ms["control"], q) / percentile(
                ms["idle"], q
            )
    for k in ("training_steps_in_phase", "training_phase_s", "job_status_at_phase_end"):
        out[f"F2 {k}"] = f2[k]
    out["load average at the end (1, 5, 15 min)"] = os.getloadavg()
    out["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=300, help="per F2 phase")
    parser.add_argument(
        "--control", action=argparse.BooleanOptionalAction, default=True,
        help="a third phase, idle again after the job (the box's drift)",
    )  # fmt: skip
    parser.add_argument("--num-cpus", type=int, default=8, help="the Ray instance's logical CPUs")
    parser.add_argument("--out", type=Path, default=Path("bench/results/finetune_serving.json"))
    args = parser.parse_args()
    model_dir = default_model_path(MODEL)
    if not model_dir.is_dir():
        make_default(MODEL)
    load_before = os.getloadavg()
    ray.init(address="local", num_cpus=args.num_cpus, log_to_driver=False)  # a fresh instance
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        with tempfile.TemporaryDirectory(prefix="tiered-ftbench-") as state:
            serve.run(build_from_config(config(model_dir, Path(state))), name=APP, route_prefix="/")
            c = openai.OpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=120
            )
            small = training_file(c, 8)
            f1 = [succeeded_to_first_token(c, small) for _ in range(args.jobs)]
            f2 = serving_beside_training(c, args.requests, args.control)
            serve.delete(APP)
    finally:
        serve.shutdown()
        ray.shutdown()
    result = {"load average at the start (1, 5, 15 min)": load_before, **figures(f1, f2)}
    emit("Fine-tuning beside serving (tiny model, one local Ray instance)", result, args.out)


if __name__ == "__main__":
    main()
