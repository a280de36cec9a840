"""The streaming client against a scripted server (httpx.MockTransport): chunk times,
usage, tier, errors, and SSE lines split only at LF."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx

from bench.client import RequestRecord, request_body, stream_request


class Parts(httpx.AsyncByteStream):
    """A body delivered in the given pieces, as a network would cut it."""

    def __init__(self, parts: list[bytes]) -> None:
        self.parts = parts

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for part in self.parts:
            yield part


def chunk(content: str | None = None, usage: dict | None = None) -> bytes:
    payload: dict = {"object": "chat.completion.chunk", "service_tier": "dedicated"}
    payload["choices"] = [] if content is None else [{"index": 0, "delta": {"content": content}}]
    if usage is not None:
        payload["usage"] = usage
    return f"data: {json.dumps(payload, ensure_ascii=False)}\r\n\r\n".encode()


def run(handler, body: dict | None = None, api: str = "chat") -> tuple[RequestRecord, list[dict]]:  # type: ignore[no-untyped-def]
    seen: list[dict] = []

    def recording(request: httpx.Request) -> httpx.Response:
        seen.append({"url": str(request.url), "auth": request.headers["authorization"],
                     "body": json.loads(request.content)})
        return handler(request)

    async def go() -> RequestRecord:
        async with httpx.AsyncClient(transport=httpx.MockTransport(recording)) as client:
            record = RequestRecord("acme", "p", 0.0)
            messages = [{"role": "user", "content": "hi"}]
            req = body or request_body("chat", "m", messages, 3, service_tier="auto")
            return await stream_request(client, "http://x/v1/", "key", req, record, api)

    return asyncio.run(go()), seen


def test_stream_with_line_separators_inside_the_text() -> None:
    usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10,
             "prompt_tokens_details": {"cached_tokens": 4}}
    body = chunk("a\u2028b") + chunk("c\x85") + chunk("d") + chunk(usage=usage)
    body += b"data: [DONE]\n\n"
    parts = [body[:5], body[5:40], body[40:41], body[41:]]  # cut anywhere, even mid-line
    headers = {"content-type": "text/event-stream", "x-tiered-replica": "r1"}
    record, seen = run(lambda r: httpx.Response(200, headers=headers, stream=Parts(parts)))
    assert record.ok and record.error is None, record.error
    assert len(record.chunks) == 3 and record.chunks == sorted(record.chunks)
    assert record.text == "a\u2028bc\x85d"
    assert (record.prompt_tokens, record.completion_tokens, record.cached_tokens) == (7, 3, 4)
    assert record.service_tier == "dedicated" and record.replica == "r1"
    assert record.send <= record.chunks[0] <= record.end
    sent = seen[0]
    assert sent["url"] == "http://x/v1/chat/completions" and sent["auth"] == "Bearer key"
    assert sent["body"]["stream"] is True and sent["body"]["max_tokens"] == 3
    assert sent["body"]["stream_options"] == {"include_usage": True}
    assert sent["body"]["ignore_eos"] is True and sent["body"]["service_tier"] == "auto"


def test_http_error_and_stream_error_are_results() -> None:
    error = {"error": {"message": "slow down", "type": "x", "param": None,
                       "code": "rate_limit_exceeded"}}
    record, _ = run(lambda r: httpx.Response(429, json=error, headers={"retry-after": "1"}))
    assert not record.ok and record.status == 429 and record.error_key == "429"
    assert "rate_limit_exceeded" in (record.error or "")

    broken = chunk("x") + b'data: {"error": {"message": "m", "code": "engine_dead"}}\n\n'
    record, _ = run(lambda r: httpx.Response(200, stream=Parts([broken])))
    assert not record.ok and record.error_key == "stream_error"

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    record, _ = run(refuse)
    assert record.status == 0 and record.error_key == "transport" and record.end >= record.send


def test_completions_api_and_no_usage() -> None:
    text = b'data: {"choices": [{"index": 0, "text": "x"}]}\n\n' * 4 + b"data: [DONE]\n\n"
    body = request_body("completions", "m", "a prompt", 4, ignore_eos=False, temperature=0.0)
    assert "ignore_eos" not in body and body["prompt"] == "a prompt"

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/completions"
        return httpx.Response(200, stream=Parts([text]))

    record, _ = run(handler, body, "completions")
    assert record.ok and record.text == "xxxx"
    assert record.completion_tokens is None and record.output_tokens == 4  # counted chunks
