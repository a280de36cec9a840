"""One streaming request to an OpenAI-compatible endpoint, timed chunk by chunk.

The record keeps what the metrics need and nothing they would have to re-derive: the send
time, the arrival time of every chunk that carries choices (as `vllm bench serve` counts
them: the first is the TTFT, the gaps are the ITL), the end (the `[DONE]` event; the
body is still read to its end, as the openai SDK does), the HTTP status, the tier
that served it (`service_tier` in the body, or the `x-tiered-service-tier` header), the
replica header, and the usage of the final chunk (`stream_options.include_usage`),
`prompt_tokens_details.cached_tokens` included. Times are `time.perf_counter()` seconds.

`api: responses` speaks OpenAI's Responses stream instead (`POST /v1/responses`, typed
`event:`/`data:` frames, no `[DONE]`): each `response.output_text.delta` is a chunk, the
terminal event (`response.completed`, or `response.incomplete` when max_output_tokens
ended it) is the end and carries the usage (`input_tokens`,
`input_tokens_details.cached_tokens`) and the response id that the next turn continues.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

TIER_HEADER = "x-tiered-service-tier"
REPLICA_HEADER = "x-tiered-replica"


@dataclass
class RequestRecord:
    tenant: str
    phase: str
    send: float
    turn: int = 1
    conversation: int | None = None
    chunks: list[float] = field(default_factory=list)
    end: float = 0.0
    status: int = 0  # HTTP status; 0 when no response came (connection error, timeout)
    error: str | None = None
    service_tier: str | None = None
    replica: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    max_tokens: int = 0
    text: str = ""
    response_id: str | None = None  # api responses: what the next turn continues from
    previous_replica: str | None = None  # the replica of the conversation's previous turn
    reusable_tokens: int | None = None  # the previous turn's prompt + output tokens
    logprob_tokens: int = 0  # tokens counted from chunks' logprobs (a request asking for them)

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and bool(self.chunks)

    @property
    def output_tokens(self) -> int:
        """Completion tokens from usage; the number of chunks when usage is absent."""
        if self.completion_tokens is not None:
            return self.completion_tokens
        return len(self.chunks)

    @property
    def error_key(self) -> str | None:
        """How the error is counted: the status code, or what went wrong without one."""
        if self.ok:
            return None
        if self.status and self.status != 200:
            return str(self.status)
        return self.error.split(":", 1)[0] if self.error else "no_output"

    def to_json(self, t0: float, with_chunks: bool = True) -> dict[str, Any]:
        """Times relative to t0, in seconds, without the generated text."""
        out = asdict(self)
        out.pop("text")
        out["send"] = round(self.send - t0, 6)
        out["end"] = round(self.end - t0, 6)
        out["chunks"] = [round(c - t0, 6) for c in self.chunks] if with_chunks else None
        out["ttft_s"] = round(self.chunks[0] - self.send, 6) if self.ok else None
        return out


def request_body(
    api: str,
    model: str,
    prompt: str | list[dict[str, str]],
    max_tokens: int,
    *,
    ignore_eos: bool = True,
    temperature: float | None = None,
    service_tier: str | None = None,
    previous_response_id: str | None = None,
) -> dict[str, Any]:
    if api == "responses":
        return responses_body(
            model, prompt, max_tokens, temperature=temperature, service_tier=service_tier,
            previous_response_id=previous_response_id,
        )
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if api == "chat":
        body["messages"] = prompt
    else:
        body["prompt"] = prompt
    if ignore_eos:
        body["ignore_eos"] = True  # vLLM's extension: exactly max_tokens tokens
    if temperature is not None:
        body["temperature"] = temperature
    if service_tier is not None:
        body["service_tier"] = service_tier
    return body


def responses_body(
    model: str,
    prompt: str | list[dict[str, str]],
    max_tokens: int,
    *,
    temperature: float | None = None,
    service_tier: str | None = None,
    previous_response_id: str | None = None,
) -> dict[str, Any]:
    """A stored, streamed Responses turn: only the new input, the rest by reference."""
    body: dict[str, Any] = {
        "model": model,
        "input": prompt,
        "max_output_tokens": max_tokens,
        "stream": True,
        "store": True,
    }
    if previous_response_id is not None:
        body["previous_response_id"] = previous_response_id
    if temperature is not None:
        body["temperature"] = temperature
    if service_tier is not None:
        body["service_tier"] = service_tier
    return body


async def sse_lines(response: httpx.Response) -> AsyncIterator[str]:
    """The lines of an event stream, split only at LF (and CRLF), as the SSE format says.

    Not `response.aiter_lines()`: it splits like str.splitlines, also at U+2028, U+0085
    and other characters that a server writing JSON with ensure_ascii=False may put raw
    inside a chunk's text, which would cut a data line in two.
    """
    buffer = b""
    async for chunk in response.aiter_bytes():
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r").decode("utf-8", "replace")
    if buffer:
        yield buffer.rstrip(b"\r").decode("utf-8", "replace")


def _path(api: str) -> str:
    return {"chat": "/chat/completions", "responses": "/responses"}.get(api, "/completions")


TERMINAL_EVENTS = ("response.completed", "response.incomplete")


def _take_event(record: RequestRecord, data: dict[str, Any], now: float) -> bool:
    """One Responses stream event; True at the terminal one (the end of the response)."""
    kind = data.get("type")
    if kind == "response.output_text.delta":
        record.chunks.append(now)
        record.text += data.get("delta") or ""
        return False
    if kind == "error":
        record.error = f"stream_error: {data.get('code') or data.get('message') or data}"
        return True
    response = data.get("response") or {}
    record.response_id = response.get("id") or record.response_id
    record.service_tier = response.get("service_tier") or record.service_tier
    if kind == "response.failed":
        err = response.get("error") or {}
        record.error = f"stream_error: {err.get('code') or err.get('message') or 'failed'}"
        return True
    if kind not in TERMINAL_EVENTS:
        return False
    usage = response.get("usage") or {}
    record.prompt_tokens = usage.get("input_tokens")
    record.completion_tokens = usage.get("output_tokens")
    record.cached_tokens = (usage.get("input_tokens_details") or {}).get("cached_tokens")
    return True


def _take_chunk(record: RequestRecord, data: dict[str, Any], now: float, api: str) -> None:
    if "error" in data and not data.get("choices"):
        err = data["error"] or {}
        record.error = f"stream_error: {err.get('code') or err.get('message') or err}"
        return
    record.service_tier = data.get("service_tier") or record.service_tier
    choices = data.get("choices")
    if choices:
        record.chunks.append(now)
        first = choices[0]
        piece = (first.get("delta") or {}).get("content") if api == "chat" else first.get("text")
        record.text += piece or ""
        record.logprob_tokens += len((first.get("logprobs") or {}).get("content") or [])
    usage = data.get("usage")
    if usage:
        record.prompt_tokens = usage.get("prompt_tokens")
        record.completion_tokens = usage.get("completion_tokens")
        details = usage.get("prompt_tokens_details") or {}
        record.cached_tokens = details.get("cached_tokens")


async def stream_request(
    client: httpx.AsyncClient,
    base_url: str,
    key: str,
    body: dict[str, Any],
    record: RequestRecord,
    api: str = "chat",
) -> RequestRecord:
    """Send one streaming request and fill `record`; never raises for HTTP or transport
    errors (they are results), only for cancellation."""
    record.max_tokens = int(body.get("max_tokens", body.get("max_output_tokens", 0)))
    headers = {"Authorization": f"Bearer {key}"}
    record.send = time.perf_counter()
    try:
        async with client.stream(
            "POST", base_url.rstrip("/") + _path(api), json=body, headers=headers
        ) as response:
            record.status = response.status_code
            record.service_tier = response.headers.get(TIER_HEADER)
            record.replica = response.headers.get(REPLICA_HEADER)
            if response.status_code != 200:
                raw = await response.aread()
                record.error = f"http_{response.status_code}: {_error_message(raw)}"
            else:
                done_at = None
                async for line in sse_lines(response):
                    # Read to the end of the body, as the openai SDK does: leaving at [DONE]
                    # would close the connection under the server (a disconnect per request,
                    # and no keep-alive).
                    now = time.perf_counter()
                    if done_at is not None or not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        done_at = now
                        continue
                    try:
                        data = json.loads(payload)
                    except json.JSONDecodeError:
                        record.error = "bad_json: a stream chunk is not JSON"
                        continue
                    if api != "responses":
                        _take_chunk(record, data, now, api)
                    elif _take_event(record, data, now):
                        done_at = now
                if api == "responses" and done_at is None and record.error is None:
                    record.error = "incomplete_stream: no terminal response event"
                record.end = done_at or time.perf_counter()
    except httpx.TimeoutException as exc:
        record.error = f"timeout: {type(exc).__name__}"
    except httpx.HTTPError as exc:
        record.error = f"transport: {type(exc).__name__}: {exc}"
    record.end = record.end or time.perf_counter()
    if record.status == 200 and record.error is None and not record.chunks:
        record.error = "no_output: the stream carried no choices"
    return record


def _error_message(raw: bytes) -> str:
    try:
        err = json.loads(raw).get("error") or {}
        return str(err.get("code") or err.get("message") or err)[:200]
    except (ValueError, AttributeError):
        return raw[:200].decode("utf-8", "replace")
