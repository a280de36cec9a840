"""Engine outputs rendered as OpenAI response bodies and SSE chunks."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from models.outputs import CompletionDelta, TokenLogprob, Usage


def usage_json(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chat_logprobs(items: list[TokenLogprob]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": lp.token,
                "logprob": lp.logprob,
                "bytes": _bytes(lp.token),
                "top_logprobs": [
                    {"token": t, "logprob": v, "bytes": _bytes(t)} for _, t, v in lp.top
                ],
            }
            for lp in items
        ]
    }


def completion_logprobs(items: list[TokenLogprob], offset: int) -> dict[str, Any]:
    offsets, pos = [], offset
    for lp in items:
        offsets.append(pos)
        pos += len(lp.token)
    return {
        "tokens": [lp.token for lp in items],
        "token_logprobs": [lp.logprob for lp in items],
        "top_logprobs": [{t: v for _, t, v in lp.top} for lp in items],
        "text_offset": offsets,
    }


@dataclass
class ResponseBuilder:
    """Accumulates deltas per choice and renders either chunks or the final body."""

    kind: str  # "chat" | "completion"
    request_id: str
    model: str
    service_tier: str
    n: int
    created: int = field(default_factory=lambda: int(time.time()))
    texts: dict[int, str] = field(default_factory=dict)
    logprobs: dict[int, list[TokenLogprob]] = field(default_factory=dict)
    finish: dict[int, str] = field(default_factory=dict)
    usage: Usage = field(default_factory=Usage)
    _chunk_head: str | None = field(default=None, init=False, repr=False)

    @property
    def object_name(self) -> str:
        return "chat.completion" if self.kind == "chat" else "text_completion"

    def _header(self, chunk: bool) -> dict[str, Any]:
        obj = self.object_name + (".chunk" if chunk and self.kind == "chat" else "")
        return {
            "id": self.request_id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "service_tier": self.service_tier,
            "system_fingerprint": "tiered",
        }

    def add(self, delta: CompletionDelta) -> None:
        self.texts[delta.index] = self.texts.get(delta.index, "") + delta.text
        if delta.logprobs is not None:
            self.logprobs.setdefault(delta.index, []).extend(delta.logprobs)
        if delta.finish_reason:
            self.finish[delta.index] = "stop" if delta.finish_reason == "stop" else "length"

    def chunk_choice(self, delta: CompletionDelta, first: bool, offset: int) -> dict[str, Any]:
        finish = None
        if delta.finish_reason:
            finish = "stop" if delta.finish_reason == "stop" else "length"
        if self.kind == "chat":
            body: dict[str, Any] = {"content": delta.text}
            if first:
                body = {"role": "assistant", **body}
            lp = chat_logprobs(delta.logprobs) if delta.logprobs is not None else None
            return {"index": delta.index, "delta": body, "logprobs": lp, "finish_reason": finish}
        lp = completion_logprobs(delta.logprobs, offset) if delta.logprobs is not None else None
        return {"index": delta.index, "text": delta.text, "logprobs": lp, "finish_reason": finish}

    def chunk(self, choices: list[dict[str, Any]], include_usage: bool) -> str:
        """The event `sse({**header, "choices": choices, "usage": None})` writes, byte for
        byte, with the header (the same in every event) encoded once per stream."""
        if self._chunk_head is None:
            head = json.dumps(self._header(chunk=True), ensure_ascii=False)
            self._chunk_head = f'data: {head[:-1]}, "choices": '
        tail = ', "usage": null}\n\n' if include_usage else "}\n\n"
        return self._chunk_head + json.dumps(choices, ensure_ascii=False) + tail

    def usage_chunk(self) -> str:
        return sse({**self._header(chunk=True), "choices": [], "usage": usage_json(self.usage)})

    def body(self) -> dict[str, Any]:
        choices = []
        for i in range(self.n):
            text = self.texts.get(i, "")
            lp_items = self.logprobs.get(i)
            if self.kind == "chat":
                choice: dict[str, Any] = {
                    "index": i,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": chat_logprobs(lp_items) if lp_items is not None else None,
                }
            else:
                choice = {
                    "index": i,
                    "text": text,
                    "logprobs": completion_logprobs(lp_items, 0) if lp_items is not None else None,
                }
            choice["finish_reason"] = self.finish.get(i, "length")
            choices.append(choice)
        return {**self._header(chunk=False), "choices": choices, "usage": usage_json(self.usage)}


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
