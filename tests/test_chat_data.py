"""The chat fine-tuning format's checks, line by line (no Ray, no model)."""

from __future__ import annotations

import json

import pytest

from models.chat_data import ChatDataError, parse_chat_jsonl


def lines(*objs: object) -> bytes:
    return "\n".join(o if isinstance(o, str) else json.dumps(o) for o in objs).encode()


GOOD = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
}


def test_accepts_examples_skips_blank_lines_and_reads_weights_and_parts() -> None:
    weighted = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}],
            },
            {"role": "assistant", "content": "skip me", "weight": 0},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": "train me", "weight": 1},
        ]
    }
    examples = parse_chat_jsonl(lines(GOOD, "", weighted) + b"\n\n")
    assert len(examples) == 2
    assert examples[0].as_prompt()[2] == {"role": "assistant", "content": "Hello!"}
    assert [m.trained for m in examples[0].messages] == [False, False, True]
    assert examples[1].messages[0].content == "AB"
    assert [m.trained for m in examples[1].messages] == [False, False, False, True]


@pytest.mark.parametrize(
    ("data", "line", "reason"),
    [
        (lines(GOOD, "{not json"), 2, "not valid JSON"),
        (lines(GOOD, GOOD, [1, 2]), 3, "expected a JSON object"),
        (lines({"prompt": "x", "completion": "y"}), 1, "messages: Field required"),
        (lines({"messages": []}), 1, "messages: List should have at least 1 item"),
        (lines({"messages": [{"role": "user", "content": "x"}]}), 1, "no assistant message"),
        (lines({"messages": [{"role": "robot", "content": "x"}]}), 1, "messages[0].role"),
        (lines({"messages": [{"role": "user", "content": 5}]}), 1, "messages[0].content"),
        (lines({"messages": [{"role": "user", "content": "x", "weight": 1}]}), 1, "weight"),
        (lines(GOOD, {**GOOD, "extra": 1}), 2, "extra: unknown field"),
        (lines({**GOOD, "tools": []}), 1, "tool definitions"),
        (lines({"messages": [{"role": "tool", "content": "x"}]}), 1, "'tool' messages"),
        (lines({"messages": [{"role": "assistant", "tool_calls": []}]}), 1, "tool calls"),
        (b"", 0, "empty"),
        (b"\n \n", 0, "empty"),
        (lines(GOOD).replace(b"Hi", b"H\xffi"), 1, "not UTF-8"),
    ],
)
def test_refuses_the_first_bad_line_with_its_number(data: bytes, line: int, reason: str) -> None:
    with pytest.raises(ChatDataError) as err:
        parse_chat_jsonl(data)
    assert err.value.line == line
    assert reason in str(err.value)
    assert str(err.value).startswith(f"line {line}: ") == bool(line)
