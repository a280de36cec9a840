"""A plain Ray Serve app of the same depth as Tiered's HTTP path, for P3.

Serve proxy → FastAPI ingress → a streaming deployment, and back as OpenAI SSE chunks:
the hops Tiered's requests take, with none of its work (auth, validation, tokenization,
admission, the engine). One chunk per requested token, each produced at once, so the
difference against Tiered is what Tiered adds per request and per token.
"""

import json
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

echo_api = FastAPI()


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
class Echo:
    async def generate(self, n: int) -> AsyncIterator[str]:
        for _ in range(n):
            yield "x"


def _chunk(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress(echo_api)
class EchoIngress:
    def __init__(self, echo) -> None:  # type: ignore[no-untyped-def]
        self.echo = echo

    @echo_api.post("/v1/chat/completions")
    async def chat(self, request: Request):  # type: ignore[no-untyped-def]
        body = await request.json()
        n = max(1, int(body.get("max_tokens") or 1))
        head = {"id": "echo", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": body.get("model", "echo"), "service_tier": "echo"}
        stream = self.echo.options(stream=True).generate.remote(n)
        if not body.get("stream"):
            text = "".join([piece async for piece in stream])
            message = {"role": "assistant", "content": text}
            return JSONResponse({**head, "object": "chat.completion",
                                 "choices": [{"index": 0, "message": message}]})
        usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def sse() -> AsyncIterator[str]:
            async for piece in stream:
                delta = {"index": 0, "delta": {"content": piece}, "finish_reason": None}
                yield _chunk({**head, "choices": [delta]})
            if usage:
                counts = {"prompt_tokens": 0, "completion_tokens": n, "total_tokens": n}
                yield _chunk({**head, "choices": [], "usage": counts})
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")


def echo_app(ingress_replicas: int = 1) -> serve.Application:
    return EchoIngress.options(num_replicas=ingress_replicas).bind(Echo.bind())
