"""HTTP path figures (issue 4), each measured side by side in one run on local Ray.

- added latency: Tiered (proxy -> ingress -> model server, max_tokens=1) against a plain
  Serve app of the same depth (proxy -> FastAPI ingress -> echo deployment);
- requests/s with max_tokens=1 at a fixed concurrency;
- isolation: the dedicated tenant's p99 TTFT unloaded, then with the shared pool flooded.
  With --pinned, the dedicated and shared replicas run on disjoint cores (os affinity),
  which emulates separate nodes on this 2-core box; without it, they share both cores.

    python -m bench.api_bench [--pinned] [--out bench/results/api.json]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

import httpx
import ray
from fastapi import FastAPI
from ray import serve

from bench.report import emit
from deployments.app import build_from_config
from deployments.config import load_config
from deployments.serve_command import DEMO_KEYS

echo_api = FastAPI()


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Echo:
    async def generate(self, text: str):  # type: ignore[no-untyped-def]
        yield text


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(echo_api)
class EchoIngress:
    def __init__(self, echo) -> None:  # type: ignore[no-untyped-def]
        self.echo = echo

    @echo_api.post("/v1/chat/completions")
    async def chat(self) -> dict:
        out = [c async for c in self.echo.options(stream=True).generate.remote("x")]
        return {"choices": [{"message": {"content": out[0]}}]}


BODY = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def _latencies(url: str, key: str, n: int) -> list[float]:
    out = []
    async with httpx.AsyncClient(timeout=60) as c:
        for _ in range(n):
            t = time.perf_counter()
            r = await c.post(url, json=BODY, headers={"Authorization": f"Bearer {key}"})
            r.raise_for_status()
            out.append(time.perf_counter() - t)
    return out


async def _rps(url: str, key: str, concurrency: int, seconds: float) -> float:
    done = 0
    stop = time.perf_counter() + seconds

    async def worker(c: httpx.AsyncClient) -> None:
        nonlocal done
        while time.perf_counter() < stop:
            r = await c.post(url, json=BODY, headers={"Authorization": f"Bearer {key}"})
            done += r.status_code == 200

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=60) as c:
        await asyncio.gather(*(worker(c) for _ in range(concurrency)))
    return done / (time.perf_counter() - start)


async def _ttft(c: httpx.AsyncClient, url: str, key: str, tokens: int) -> float:
    body = {**BODY, "max_tokens": tokens, "stream": True}
    t = time.perf_counter()
    first = None
    async with c.stream("POST", url, json=body, headers={"Authorization": f"Bearer {key}"}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if first is None and line.startswith("data: {"):
                first = time.perf_counter() - t
    assert first is not None, "no chunk received"
    return first


async def _isolation(url: str, flood: bool, n: int = 30) -> dict:
    key = DEMO_KEYS["acme (dedicated)"]
    flooders: list[asyncio.Task] = []
    stop = asyncio.Event()
    async with httpx.AsyncClient(timeout=120) as c:

        async def flood_loop(tenant_key: str) -> None:
            while not stop.is_set():
                try:
                    await _ttft(c, url, tenant_key, 64)
                except Exception:
                    await asyncio.sleep(0.1)

        if flood:  # 3x the shared pool's 16 slots, from both shared tenants
            for i in range(48):
                tenant = "globex (shared)" if i % 2 else "initech (shared)"
                flooders.append(asyncio.create_task(flood_loop(DEMO_KEYS[tenant])))
            await asyncio.sleep(3)
        ttfts = [await _ttft(c, url, key, 8) for _ in range(n)]
        stop.set()
        for task in flooders:
            task.cancel()
        await asyncio.gather(*flooders, return_exceptions=True)
    return {"p50": statistics.median(ttfts), "p99": _pct(ttfts, 0.99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pinned", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench/results/api.json"))
    args = parser.parse_args()
    config = load_config()
    for tenant in config.tenants:  # the flood must reach the pool, not the tenants' own limits
        tenant.rpm = tenant.tpm = tenant.max_concurrency = None
    if args.pinned:  # dedicated on core 0, the shared pool's ranks on core 1
        config.models[0].shared_pool.cpu_affinity = [[1], [1]]
        config.tenants[0].dedicated.replica.cpu_affinity = [[0]]  # type: ignore[union-attr]
    ray.init(num_cpus=8, include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 8123})
    serve.run(build_from_config(config), name="tiered", route_prefix="/")
    serve.run(EchoIngress.bind(Echo.bind()), name="echo", route_prefix="/echo")
    tiered = "http://127.0.0.1:8123/v1/chat/completions"
    echo = "http://127.0.0.1:8123/echo/v1/chat/completions"
    key = DEMO_KEYS["globex (shared)"]
    asyncio.run(_latencies(tiered, key, 5))
    asyncio.run(_latencies(echo, key, 5))
    tiered_lat = asyncio.run(_latencies(tiered, key, 50))
    echo_lat = asyncio.run(_latencies(echo, key, 50))
    result = {
        "machine": "2-core CPU box, local Ray, default config (tiny model)",
        "pinned": args.pinned,
        "tiered_p50_ms": statistics.median(tiered_lat) * 1000,
        "echo_p50_ms": statistics.median(echo_lat) * 1000,
        "added_p50_ms": (statistics.median(tiered_lat) - statistics.median(echo_lat)) * 1000,
        "rps_max_tokens_1": asyncio.run(_rps(tiered, DEMO_KEYS["acme (dedicated)"], 8, 10)),
    }
    unloaded = asyncio.run(_isolation(tiered, flood=False))
    flooded = asyncio.run(_isolation(tiered, flood=True))
    result |= {
        "dedicated_ttft_p99_unloaded_ms": unloaded["p99"] * 1000,
        "dedicated_ttft_p99_flooded_ms": flooded["p99"] * 1000,
        "isolation_ratio_p99": flooded["p99"] / unloaded["p99"],
    }
    serve.shutdown()
    ray.shutdown()
    emit("Tiered HTTP path (one run)", result, args.out)


if __name__ == "__main__":
    main()
