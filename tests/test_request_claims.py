"""Releases survive the cancellation of their request.

When a client goes away, Serve cancels its request and Ray cancels the request's child
calls with it (ray-project/ray#52476). A seat release sent from the request's context was
seen dropped that way (the seat stayed taken); `remote_outside_request`, which the
ingress's admission client sends every finish with, submits it from an empty context.
Checked deterministically: the release is queued behind a busy actor when the request is
cancelled, and must still arrive. (Whether a call sent from the request's own context is
dropped is Ray's behaviour, not ours, so it is not asserted.)
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import ray
from fastapi import FastAPI
from ray import serve

from deployments.tenancy.client import remote_outside_request


@ray.remote(num_cpus=0, max_concurrency=1)
class Recorder:
    """An async actor, like the admission actor, taking one call at a time: a `record`
    sent while `block` runs waits in its queue."""

    def __init__(self) -> None:
        self.records: list[str] = []

    async def block(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def record(self, tag: str) -> None:
        self.records.append(tag)

    async def seen(self) -> list[str]:
        return self.records


claims_api = FastAPI()


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(claims_api)
class Caller:
    """Like the ingress: an HTTP request that sends a release, then waits (for a stream)."""

    def __init__(self, recorder) -> None:  # type: ignore[no-untyped-def]
        self.recorder = recorder

    @claims_api.post("/call")
    async def call(self, tag: str) -> dict:
        remote_outside_request(self.recorder.record, tag)
        await asyncio.sleep(60)  # the client leaves while this waits
        return {}


def test_a_call_sent_outside_the_request_survives_the_client_leaving(ray_cluster) -> None:
    recorder = Recorder.remote()
    serve.run(Caller.bind(recorder), name="claims", route_prefix="/claims")
    url = f"http://127.0.0.1:{ray_cluster.serve_port}/claims/call"
    try:
        blocking = recorder.block.remote(4.0)
        with pytest.raises(httpx.ReadTimeout):  # the client leaves after 1 s
            httpx.post(url, params={"tag": "release"}, timeout=1.0)
        ray.get(blocking, timeout=30)
        time.sleep(1.0)
        seen = ray.get(recorder.seen.remote(), timeout=10)
        assert seen == ["release"]
    finally:
        serve.delete("claims")
        ray.kill(recorder)
