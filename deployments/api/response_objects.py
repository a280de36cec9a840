"""OpenAI's Response object, its message items and its typed SSE events.

Shapes follow the official SDK's types (openai.types.responses): tests validate every
object and event against them, and feed the event stream through the SDK's own stream
accumulator. The ingress owns a ResponseDraft and mutates it while generating; every
renderer here reads the draft at the moment it is called, so the same draft gives the
stored body, the JSON answer and each event.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any

# ResponseError.code is an enum in OpenAI's schema; typed clients may refuse other codes,
# so anything else (ours: model_unavailable, state_store_unavailable...) is "server_error".
RESPONSE_ERROR_CODES = frozenset(
    {
        "server_error",
        "rate_limit_exceeded",
        "invalid_prompt",
        "data_residency_mismatch",
        "bio_policy",
        "misalignment_policy_violation",
        "vector_store_timeout",
    }
)
DEFAULT_ERROR_MESSAGE = "The server had an error processing your request."
# A message item's status for each status of its response.
_ITEM_STATUS = {
    "in_progress": "in_progress",
    "completed": "completed",
    "incomplete": "incomplete",
    "failed": "incomplete",
    "cancelled": "incomplete",
}


@dataclass
class ResponseDraft:
    """What the ingress knows about a response while making it (mutated as it goes)."""

    id: str
    created_at: int
    model: str
    message_id: str
    instructions: str | None
    previous_response_id: str | None
    conversation_id: str | None
    store: bool
    service_tier: str
    metadata: dict[str, str]
    temperature: float
    top_p: float
    max_output_tokens: int | None
    user: str | None
    text: str = ""
    status: str = "in_progress"  # in_progress|completed|incomplete|failed|cancelled
    incomplete_reason: str | None = None  # "max_output_tokens"
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    error: dict[str, str] | None = None  # {"code", "message"} when failed
    # Stamped the first time a completed draft is rendered, so every rendering agrees.
    completed_at: int | None = field(default=None)


def output_text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(
    item_id: str, role: str, text: str, *, output: bool, status: str = "completed"
) -> dict[str, Any]:
    """A message item as OpenAI stores and returns it: `output_text` parts for what a
    model said (output=True), `input_text` parts for everything a client sent."""
    part = output_text_part(text) if output else {"type": "input_text", "text": text}
    return {
        "type": "message",
        "id": item_id,
        "role": role,
        "status": status,
        "content": [part],
    }


def _usage(d: ResponseDraft) -> dict[str, Any]:
    return {
        "input_tokens": d.input_tokens,
        "input_tokens_details": {
            "cached_tokens": d.cached_tokens,
            # What the prefix cache did not hold is written to it by this request.
            "cache_write_tokens": max(d.input_tokens - d.cached_tokens, 0),
        },
        "output_tokens": d.output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": d.input_tokens + d.output_tokens,
    }


def _error(d: ResponseDraft) -> dict[str, Any] | None:
    if d.status != "failed":
        return None
    error = d.error or {}
    code = error.get("code") or "server_error"
    return {
        "code": code if code in RESPONSE_ERROR_CODES else "server_error",
        "message": error.get("message") or DEFAULT_ERROR_MESSAGE,
    }


def _output(d: ResponseDraft) -> list[dict[str, Any]]:
    """OpenAI's `output` is empty until something was generated (as at response.created);
    a response that ended with nothing still shows its (empty) message when it finished
    normally, so clients reading output_text get "" rather than a missing item."""
    if not d.text and d.status in ("in_progress", "failed", "cancelled"):
        return []
    status = _ITEM_STATUS.get(d.status, "incomplete")
    return [message_item(d.message_id, "assistant", d.text, output=True, status=status)]


def response_object(d: ResponseDraft) -> dict[str, Any]:
    """OpenAI's Response JSON for the draft as it is now."""
    if d.status == "completed" and d.completed_at is None:
        d.completed_at = int(time.time())
    finished = d.status != "in_progress"
    return {
        "id": d.id,
        "object": "response",
        "created_at": d.created_at,
        "status": d.status,
        "background": False,
        "completed_at": d.completed_at if d.status == "completed" else None,
        "error": _error(d),
        "incomplete_details": (
            {"reason": d.incomplete_reason} if d.status == "incomplete" else None
        ),
        "instructions": d.instructions,
        "max_output_tokens": d.max_output_tokens,
        "max_tool_calls": None,
        "model": d.model,
        "output": _output(d),
        "parallel_tool_calls": True,
        "previous_response_id": d.previous_response_id,
        "conversation": {"id": d.conversation_id} if d.conversation_id else None,
        "reasoning": {"effort": None, "summary": None},
        "service_tier": d.service_tier,
        "store": d.store,
        "temperature": d.temperature,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_logprobs": 0,
        "top_p": d.top_p,
        "truncation": "disabled",
        "usage": _usage(d) if finished else None,
        "user": d.user,
        "metadata": dict(d.metadata),
    }


class ResponseEvents:
    """The typed SSE events of one streamed response, numbered from 0.

    One message item (output_index 0) with one output_text part (content_index 0).
    `closing` and `failed` send the opening events first if they were never sent, so a
    stream always begins with response.created, as the SDK's accumulator requires.
    """

    def __init__(self, draft: ResponseDraft) -> None:
        self.draft = draft
        self._sequence = 0
        self._opened = False

    def _frame(self, kind: str, payload: dict[str, Any]) -> str:
        data = {"type": kind, "sequence_number": self._sequence, **payload}
        self._sequence += 1
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.draft.message_id, "output_index": 0, "content_index": 0}

    def _response(self, kind: str, draft: ResponseDraft | None = None) -> str:
        return self._frame(kind, {"response": response_object(draft or self.draft)})

    def opening(self) -> list[str]:
        """response.created, response.in_progress, then the message item and its part."""
        if self._opened:
            return []
        self._opened = True
        # The response as it starts: nothing generated yet, whatever the draft holds.
        start = dataclasses.replace(self.draft, status="in_progress", text="")
        item = message_item(
            self.draft.message_id, "assistant", "", output=True, status="in_progress"
        )
        item["content"] = []
        return [
            self._response("response.created", start),
            self._response("response.in_progress", start),
            self._frame("response.output_item.added", {"output_index": 0, "item": item}),
            self._frame(
                "response.content_part.added", {**self._where(), "part": output_text_part("")}
            ),
        ]

    def delta(self, text: str) -> str:
        return self._frame(
            "response.output_text.delta", {**self._where(), "delta": text, "logprobs": []}
        )

    def closing(self) -> list[str]:
        """The done events of the text, part and item, then the terminal event:
        response.completed, or response.incomplete for an incomplete or cancelled draft
        (OpenAI's stream has no cancelled event), or response.failed for a failed one."""
        d = self.draft
        if d.status == "failed":
            return self.failed()
        if d.status not in ("completed", "incomplete", "cancelled"):
            raise ValueError(f"closing() needs a finished draft, not status {d.status!r}")
        frames = self.opening()
        item = message_item(
            d.message_id, "assistant", d.text, output=True, status=_ITEM_STATUS[d.status]
        )
        frames += [
            self._frame(
                "response.output_text.done", {**self._where(), "text": d.text, "logprobs": []}
            ),
            self._frame(
                "response.content_part.done", {**self._where(), "part": output_text_part(d.text)}
            ),
            self._frame("response.output_item.done", {"output_index": 0, "item": item}),
        ]
        kind = "response.completed" if d.status == "completed" else "response.incomplete"
        frames.append(self._response(kind))
        return frames

    def failed(self) -> list[str]:
        """response.failed carrying the draft's error; its output keeps what was made."""
        frames = self.opening()
        failed = self.draft
        if failed.status != "failed":
            failed = dataclasses.replace(failed, status="failed")
        frames.append(self._response("response.failed", failed))
        return frames
