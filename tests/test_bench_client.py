"""The streaming client against a scripted server (httpx.MockTransport): chunk times,
usage, tier, errors, SSE lines split only at LF, the Responses stream, and the turns of a
conversation in each API."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest

from bench.client import RequestRecord, request_body, stream_request
from bench.runner import Runner
from bench.scenario import parse_scenario


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


# ---- api: responses ---------------------------------------------------------------------
def event(kind: str, **payload: object) -> bytes:
    data = json.dumps({"type": kind, "sequence_number": 0, **payload}, ensure_ascii=False)
    return f"event: {kind}\ndata: {data}\n\n".encode()


def response_stream(
    rid: str, text: list[str], usage: tuple[int, int, int], terminal: str = "response.completed"
) -> bytes:
    """A Responses stream as the ingress writes it: created, deltas, the terminal event."""
    start = {"id": rid, "status": "in_progress", "usage": None, "service_tier": "default"}
    body = event("response.created", response=start)
    body += event("response.in_progress", response=start)
    for piece in text:
        body += event("response.output_text.delta", item_id="msg_1", output_index=0,
                      content_index=0, delta=piece, logprobs=[])
    body += event("response.output_text.done", text="".join(text))
    prompt, cached, out = usage
    done = {**start, "status": "completed", "service_tier": "shared",
            "usage": {"input_tokens": prompt, "output_tokens": out,
                      "total_tokens": prompt + out,
                      "input_tokens_details": {"cached_tokens": cached}}}
    return body + event(terminal, response=done)


def test_responses_body_sends_the_new_input_by_reference() -> None:
    new = [{"role": "user", "content": "next"}]
    body = request_body("responses", "m", new, 8, ignore_eos=True, previous_response_id="resp_1")
    assert body == {"model": "m", "input": new, "max_output_tokens": 8, "stream": True,
                    "store": True, "previous_response_id": "resp_1"}  # no vLLM ignore_eos
    first = request_body("responses", "m", "hi", 8, temperature=0.0, service_tier="auto")
    assert "previous_response_id" not in first and first["input"] == "hi"
    assert first["temperature"] == 0.0 and first["service_tier"] == "auto"


def test_responses_stream_deltas_usage_and_id() -> None:
    stream = response_stream("resp_7", ["a\u2028b", "c", "d"], (120, 96, 3))
    headers = {"content-type": "text/event-stream", "x-tiered-replica": "r2"}
    cuts = [stream[:7], stream[7:300], stream[300:]]
    body = request_body("responses", "m", "hi", 3, previous_response_id="resp_6")
    record, seen = run(lambda r: httpx.Response(200, headers=headers, stream=Parts(cuts)),
                       body, "responses")
    assert record.ok, record.error
    assert seen[0]["url"] == "http://x/v1/responses"
    assert seen[0]["body"]["previous_response_id"] == "resp_6"
    assert len(record.chunks) == 3 and record.text == "a\u2028bcd"
    assert (record.prompt_tokens, record.cached_tokens, record.completion_tokens) == (120, 96, 3)
    assert record.response_id == "resp_7" and record.replica == "r2"
    assert record.service_tier == "shared" and record.max_tokens == 3
    assert record.chunks[-1] <= record.end  # the end is the terminal event
    out = record.to_json(record.send)
    assert out["ttft_s"] == pytest.approx(record.chunks[0] - record.send, abs=1e-6)


def test_responses_incomplete_failed_and_cut_streams() -> None:
    body = request_body("responses", "m", "hi", 2)
    capped = response_stream("resp_1", ["a", "b"], (5, 0, 2), terminal="response.incomplete")
    record, _ = run(lambda r: httpx.Response(200, stream=Parts([capped])), body, "responses")
    assert record.ok and record.completion_tokens == 2  # max_output_tokens: still an answer

    failed = response_stream("resp_2", ["a"], (5, 0, 1), terminal="response.failed")
    failed = failed.replace(b'"usage"', b'"error": {"code": "server_error"}, "usage"')
    record, _ = run(lambda r: httpx.Response(200, stream=Parts([failed])), body, "responses")
    assert not record.ok and record.error == "stream_error: server_error"

    cut = response_stream("resp_3", ["a"], (5, 0, 1)).rsplit(b"event:", 1)[0]
    record, _ = run(lambda r: httpx.Response(200, stream=Parts([cut])), body, "responses")
    assert not record.ok and record.error_key == "incomplete_stream"


def conversation_runner(api: str) -> tuple[Runner, list[dict]]:
    spec = {"name": "c", "model": "m", "warmup_requests": 0,
            "tenants": {"t": {"key": "k", "api": api, "prompt_tokens": 4, "output_tokens": 2,
                              "ignore_eos": False, "conversation": {"turns": 3},
                              "load": {"concurrency": 1}}},
            "phases": [{"name": "p", "duration_s": 1}]}
    return Runner(parse_scenario(spec), {"main": "http://x/v1"}, progress=False), []


def drive(runner: Runner, handler) -> list[RequestRecord]:  # type: ignore[no-untyped-def]
    async def go() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            await runner._unit(client, runner.tenants["t"], "p")

    asyncio.run(go())
    return runner.records


def test_responses_conversation_sends_only_the_new_turn() -> None:
    runner, bodies = conversation_runner("responses")

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        n = len(bodies)
        stream = response_stream(f"resp_{n}", ["x", "y"], (100 * n, 90 * (n - 1), 2))
        return httpx.Response(200, headers={"x-tiered-replica": f"r{min(n, 2)}"},
                              stream=Parts([stream]))

    records = drive(runner, handler)
    assert [r.turn for r in records] == [1, 2, 3] and all(r.ok for r in records)
    assert "previous_response_id" not in bodies[0] and len(bodies[0]["input"]) == 1
    for i in (1, 2):
        assert bodies[i]["previous_response_id"] == f"resp_{i}"
        assert len(bodies[i]["input"]) == 1 and bodies[i]["input"][0]["role"] == "user"
    assert [r.previous_replica for r in records] == [None, "r1", "r2"]
    assert [r.reusable_tokens for r in records] == [None, 102, 202]  # prompt + output before
    assert len({r.conversation for r in records}) == 1


def test_chat_conversation_resends_the_history() -> None:
    runner, bodies = conversation_runner("chat")

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        usage = {"prompt_tokens": 10 * len(bodies), "completion_tokens": 1}
        stream = chunk("z") + chunk(usage=usage) + b"data: [DONE]\n\n"
        return httpx.Response(200, headers={"x-tiered-replica": "r1"}, stream=Parts([stream]))

    records = drive(runner, handler)
    assert [len(b["messages"]) for b in bodies] == [1, 3, 5]
    assert bodies[2]["messages"][1] == {"role": "assistant", "content": "z"}
    assert "ignore_eos" not in bodies[0] and "previous_response_id" not in bodies[1]
    assert [r.previous_replica for r in records] == [None, "r1", "r1"]
    assert [r.reusable_tokens for r in records] == [None, 11, 21]
