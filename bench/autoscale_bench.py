"""P7 (issue 5): a load step on an autoscaled shared pool, through the HTTP path.

The shared pool starts at 1 replica of 2 seats (min 1, max 2). At t=0, 6 clients stream
back to back. Reported, all from this one run:
- the time from the load step to Serve starting the second replica (the decision), to it
  RUNNING, and to its first token served (the `x-tiered-replica` header names it);
- that time against the configured upscale delay plus the measured replica start (Serve
  STARTING to RUNNING: actor process, imports, engine init), and the engine init alone;
- TTFT p50 before the step, while one replica carries it, and after the new one serves;
- the time from idle back to 1 replica, against the configured downscale delay.

    python -m bench.autoscale_bench [--out bench/results/p7-autoscale.json]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
from pathlib import Path

import httpx
import ray
from ray import serve

from bench.report import emit
from deployments.app import build_from_config, shared_deployment_name
from deployments.config import load_config
from deployments.serve_command import DEMO_KEYS

UPSCALE_DELAY_S, DOWNSCALE_DELAY_S = 2.0, 10.0
CLIENTS, STEP_S, MAX_TOKENS = 6, 45.0, 48
PORT = 8124


def _config():  # type: ignore[no-untyped-def]
    config = load_config()
    model = config.models[0]
    model.engine.max_num_seqs = 2
    model.shared_pool = model.shared_pool.model_copy(
        update={
            "tp_size": 1,
            "autoscaling": {
                "min_replicas": 1,
                "max_replicas": 2,
                "upscale_delay_s": UPSCALE_DELAY_S,
                "downscale_delay_s": DOWNSCALE_DELAY_S,
                "metrics_interval_s": 0.5,
            },
        }
    )
    for tenant in config.tenants:  # the step must reach the pool, not the tenants' limits
        tenant.rpm = tenant.tpm = tenant.max_concurrency = None
    return type(config).model_validate(config.model_dump())


async def _request(c: httpx.AsyncClient, url: str, key: str) -> dict:
    body = {
        "model": "tiny-llama",
        "messages": [{"role": "user", "content": "tell me a story"}],
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        "stream": True,
    }
    sent = time.monotonic()
    first = None
    async with c.stream("POST", url, json=body, headers={"Authorization": f"Bearer {key}"}) as r:
        replica = r.headers.get("x-tiered-replica", "")
        async for line in r.aiter_lines():
            if first is None and line.startswith("data: {"):
                first = time.monotonic()
    return {"sent": sent, "first": first or time.monotonic(), "replica": replica}


async def _step(url: str, key: str, seconds: float) -> list[dict]:
    records: list[dict] = []
    stop = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=300) as c:

        async def client() -> None:
            while time.monotonic() < stop:
                records.append(await _request(c, url, key))

        await asyncio.gather(*(client() for _ in range(CLIENTS)))
    return records


def _watch(app: str, deployment: str, marks: dict, stop: threading.Event) -> None:
    """Record when Serve starts the second replica (the scaling decision), when it is
    RUNNING, and when the pool is back at 1 after idle."""
    while not stop.is_set():
        states = serve.status().applications[app].deployments[deployment].replica_states
        n = states.get("RUNNING", 0)
        now = time.monotonic()
        if states.get("STARTING", 0) and "starting" not in marks:
            marks["starting"] = now
        if n >= 2 and "two" not in marks:
            marks["two"] = now
        if "two" in marks and "idle" in marks and n == 1 and "back" not in marks:
            marks["back"] = now
        time.sleep(0.2)


def _cold_starts(deployment: str) -> dict[str, float]:
    handle = serve.get_deployment_handle(deployment, app_name="tiered")
    seen: dict[str, float] = {}
    for _ in range(20):
        stats = handle.stats.remote().result(timeout_s=30)
        seen[stats["replica_id"]] = stats["cold_start_s"]
    return seen


def _p50(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/p7-autoscale.json"))
    args = parser.parse_args()
    config = _config()
    deployment = shared_deployment_name(config.models[0].name)
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(build_from_config(config), name="tiered", route_prefix="/")
    url = f"http://127.0.0.1:{PORT}/v1/chat/completions"
    key = DEMO_KEYS["globex (shared)"]
    first_replica = next(iter(_cold_starts(deployment)))
    unloaded = [r["first"] - r["sent"] for r in [asyncio.run(_one(url, key)) for _ in range(5)]]

    marks: dict[str, float] = {}
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=("tiered", deployment, marks, stop))
    watcher.start()
    t0 = time.monotonic()
    records = asyncio.run(_step(url, key, STEP_S))
    marks["idle"] = time.monotonic()
    cold = _cold_starts(deployment)  # before the downscale delay ends
    deadline = time.monotonic() + DOWNSCALE_DELAY_S + 60
    while "back" not in marks and time.monotonic() < deadline:
        time.sleep(0.5)
    stop.set()
    watcher.join()

    new_served = [r for r in records if r["replica"] and r["replica"] != first_replica]
    first_new = min((r["first"] for r in new_served), default=float("nan"))
    two = marks.get("two", float("nan"))
    serve.shutdown()
    ray.shutdown()
    new_cold = [v for k, v in cold.items() if k != first_replica]
    ttft_one = [r["first"] - r["sent"] for r in records if r["sent"] < two]
    ttft_two = [r["first"] - r["sent"] for r in records if r["sent"] >= first_new]
    result = {
        "machine": "2-core CPU VM, local Ray, tiny model; absolute times are CPU times",
        "upscale_delay_s": UPSCALE_DELAY_S,
        "downscale_delay_s": DOWNSCALE_DELAY_S,
        "clients": CLIENTS,
        "step_to_scale_decision_s": marks.get("starting", float("nan")) - t0,
        "replica_start_s": two - marks.get("starting", float("nan")),
        "step_to_second_replica_running_s": two - t0,
        "step_to_new_replica_first_token_s": first_new - t0,
        "new_replica_engine_init_s": new_cold[0] if new_cold else float("nan"),
        "requests_served_by_new_replica": len(new_served),
        "requests_in_step": len(records),
        "ttft_p50_unloaded_ms": _p50(unloaded) * 1000,
        "ttft_p50_one_replica_ms": _p50(ttft_one) * 1000,
        "ttft_p50_two_replicas_ms": _p50(ttft_two) * 1000,
        "idle_to_one_replica_s": marks.get("back", float("nan")) - marks["idle"],
    }
    result["step_to_serving_over_delay_plus_start"] = result[
        "step_to_new_replica_first_token_s"
    ] / (UPSCALE_DELAY_S + result["replica_start_s"])
    emit("P7: shared-pool load step (one run)", result, args.out)


async def _one(url: str, key: str) -> dict:
    async with httpx.AsyncClient(timeout=120) as c:
        return await _request(c, url, key)


if __name__ == "__main__":
    main()
