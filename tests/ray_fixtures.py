"""Helpers for the model-server tests: deploy on the session's Ray cluster, read streams
with a bounded wait, and compare against the in-process engine."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from ray import serve

from deployments.config.models import ModelSpec, ReplicaSpec
from deployments.replicas.model_server import model_server_deployment
from deployments.replicas.requests import GenerateRequest
from models.sampling_params import SamplingParams

GREEDY = {"max_tokens": 12, "temperature": 0.0, "ignore_eos": True}
LONG = {"max_tokens": 1500, "temperature": 0.0, "ignore_eos": True}  # outlives the test step
PROMPTS = [[11, 22, 33, 44, 55], list(range(100, 160)), [7] * 20]


def tiny_spec(path: Path, **replica: Any) -> tuple[ModelSpec, ReplicaSpec]:
    spec = ModelSpec(name="tiny", path=str(path), engine={"num_kv_blocks": 128})
    return spec, ReplicaSpec(**replica)


def deploy(path: Path, name: str, **replica: Any):  # type: ignore[no-untyped-def]
    """serve.run one model-server deployment as its own application; returns its handle."""
    spec, rep = tiny_spec(path, **replica)
    return serve.run(model_server_deployment(spec, rep, name), name=name, route_prefix=None)


def request(request_id: str, prompt: list[int], **params: Any) -> GenerateRequest:
    """What the ingress sends a replica: an id, token ids and sampling parameters."""
    return GenerateRequest(request_id, prompt, SamplingParams(**params))


def run(coro: Coroutine, timeout: float = 120) -> Any:
    """Run a coroutine with a hard deadline, so a hung stream fails the test."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def collect(handle, request: GenerateRequest) -> tuple[list[int], set[str]]:  # type: ignore[no-untyped-def]
    """All token ids of one stream, and the replicas that produced them."""
    tokens: list[int] = []
    replicas: set[str] = set()
    async for served in handle.options(stream=True).generate.remote(request):
        replicas.add(served.replica_id)
        tokens += [t for d in served.output.deltas for t in d.token_ids]
    return tokens, replicas


def in_process_greedy(path: Path, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Reference outputs: the engine at TP=1 in this process, one request at a time."""
    from models.engine import LLMEngine
    from models.sampling_params import SamplingParams

    spec, rep = tiny_spec(path)
    engine = LLMEngine(spec.engine_config(rep, 0, str(path)))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    results = []
    for i, prompt in enumerate(prompts):
        engine.add_request(f"ref{i}", prompt, params)
        tokens: list[int] = []
        while engine.has_unfinished():
            for out in engine.step():
                tokens += [t for d in out.deltas for t in d.token_ids]
        results.append(tokens)
    engine.shutdown()
    return results


def stats_of(handle, replica_id: str, timeout_s: float = 30) -> dict:  # type: ignore[no-untyped-def]
    """Stats of one given replica (the handle routes to any of them), polled with a pause
    between calls and a deadline: a replica that is gone fails the test, not hangs it."""
    deadline = time.monotonic() + timeout_s
    seen: set[str] = set()
    while (left := deadline - time.monotonic()) > 0:
        stats = handle.stats.remote().result(timeout_s=max(left, 1.0))
        if stats["replica_id"] == replica_id:
            return stats
        seen.add(stats["replica_id"])
        time.sleep(0.05)
    raise AssertionError(
        f"no stats from replica {replica_id} within {timeout_s}s (answered: {sorted(seen)})"
    )


def wait_idle(handle, replica_id: str, timeout_s: float = 30) -> dict:  # type: ignore[no-untyped-def]
    """Poll one replica until nothing runs or waits and no KV block is held."""
    deadline = time.monotonic() + timeout_s
    stats: dict = {}
    while time.monotonic() < deadline:
        stats = stats_of(handle, replica_id)
        if stats["num_running"] == stats["num_waiting"] == stats["kv_blocks_used"] == 0:
            return stats
        time.sleep(0.2)
    raise AssertionError(f"replica {replica_id} still busy after {timeout_s}s: {stats}")
