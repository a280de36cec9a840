"""OpenAI's chat fine-tuning format: one `{"messages": [...]}` JSON object per line.

Parsed and checked in one pass, so an upload can be refused with the first bad line's
number and the reason, and training reads exactly what was accepted. What the engine's
training cannot use (tool calls, function calls, images) is refused by name rather than
dropped. Blank lines are skipped (a trailing newline is usual); line numbers count them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

Role = Literal["system", "developer", "user", "assistant"]
# Fields OpenAI's format allows that this trainer does not implement.
_UNSUPPORTED = {
    "tools": "tool definitions",
    "functions": "function definitions",
    "parallel_tool_calls": "parallel_tool_calls",
    "tool_calls": "tool calls",
    "function_call": "function calls",
}


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Role
    content: str | list[_TextPart]
    name: str | None = None
    weight: Literal[0, 1] | None = None  # assistant messages only: 0 = not trained on


class _Line(BaseModel):
    model_config = ConfigDict(extra="forbid")

    messages: Annotated[list[_Message], Field(min_length=1)]


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str
    trained: bool  # an assistant message whose tokens carry the loss


@dataclass(frozen=True)
class ChatExample:
    messages: tuple[ChatMessage, ...]

    def as_prompt(self) -> list[dict[str, str]]:
        """The messages as the chat template takes them."""
        return [{"role": m.role, "content": m.content} for m in self.messages]


class ChatDataError(ValueError):
    """The first problem in a file: `line` is 1-based (0: the file as a whole)."""

    def __init__(self, line: int, reason: str) -> None:
        where = f"line {line}: " if line else ""
        super().__init__(f"{where}{reason}")
        self.line = line
        self.reason = reason


def _location(loc: tuple[int | str, ...]) -> str:
    """pydantic's loc -> "messages[1].role", leaving out union-member tags."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" not in part and part not in ("str", "list"):
            out += f".{part}" if out else part
    return out


def _unsupported(raw: dict[str, Any]) -> str | None:
    for key, what in _UNSUPPORTED.items():
        if key in raw:
            return f"{what} ({key!r}) are not supported for fine-tuning here"
    messages = raw.get("messages")
    for i, message in enumerate(messages if isinstance(messages, list) else []):
        if isinstance(message, dict):
            if message.get("role") in ("tool", "function"):
                return f"messages[{i}].role: {message['role']!r} messages are not supported"
            for key, what in _UNSUPPORTED.items():
                if key in message:
                    return f"messages[{i}].{key}: {what} are not supported"
    return None


def parse_line(text: str, line: int) -> ChatExample:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ChatDataError(line, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(raw, dict):
        raise ChatDataError(line, 'expected a JSON object {"messages": [...]}')
    unsupported = _unsupported(raw)
    if unsupported is not None:
        raise ChatDataError(line, unsupported)
    try:
        parsed = _Line.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = _location(tuple(first["loc"]))
        message = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
        raise ChatDataError(line, f"{where}: {message}" if where else message) from None
    messages = []
    for i, m in enumerate(parsed.messages):
        if m.weight is not None and m.role != "assistant":
            raise ChatDataError(line, f"messages[{i}].weight: only assistant messages have one")
        text_content = (
            m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
        )
        trained = m.role == "assistant" and m.weight != 0
        messages.append(ChatMessage(m.role, text_content, trained))
    if not any(m.trained for m in messages):
        raise ChatDataError(line, "no assistant message to train on (with weight 1)")
    return ChatExample(tuple(messages))


def parse_chat_jsonl(data: bytes) -> list[ChatExample]:
    """Every example in the file; ChatDataError for the first bad line or an empty file."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ChatDataError(line, "not UTF-8 text") from None
    examples = [
        parse_line(content, number)
        for number, content in enumerate(text.splitlines(), start=1)
        if content.strip()
    ]
    if not examples:
        raise ChatDataError(0, "the file holds no examples (it is empty)")
    return examples
