"""The Responses and Conversations APIs' parsing and rendering, checked against the SDK.

Every rendered object and event is validated by the official SDK's types, and the SDK's
own client (over a mock transport: no server) sends the requests we parse and reads the
bodies and SSE streams we render, as a real client would.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx2
import openai
import pytest
from openai.types import conversations as oa_conv
from openai.types import responses as oa
from openai.types.responses.response_item import ResponseItem
from pydantic import TypeAdapter

from deployments.api import response_objects as ro
from deployments.api.conversation_objects import (
    ListParams,
    conversation_deleted,
    conversation_object,
    item_list,
    response_deleted,
)
from deployments.api.errors import OpenAIError
from deployments.api.response_objects import (
    ResponseDraft,
    ResponseEvents,
    message_item,
    response_object,
)
from deployments.api.responses_protocol import (
    UNSUPPORTED,
    InputMessage,
    parse_conversation_create,
    parse_conversation_update,
    parse_items_create,
    parse_list_params,
    parse_responses_request,
)
from deployments.state.stored import StoredItem

EVENT = TypeAdapter(oa.ResponseStreamEvent)
ITEM = TypeAdapter(ResponseItem)
CONV_ITEM = TypeAdapter(oa_conv.ConversationItem)


def _req(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "input": "hi", **fields}


def _error(fn: Callable[[Any], Any], body: Any) -> OpenAIError:
    with pytest.raises(OpenAIError) as info:
        fn(body)
    return info.value


# ---- parsing POST /v1/responses ---------------------------------------------------------
def test_a_string_input_is_one_user_message_with_defaults() -> None:
    req = parse_responses_request(_req())
    assert req.messages() == [InputMessage("user", "hi")]
    assert (req.store, req.stream, req.conversation_id, req.previous_response_id) == (
        True, False, None, None,
    )  # fmt: skip
    assert req.sampling() == {"temperature": 1.0, "top_p": 1.0}
    assert req.metadata is None and req.max_output_tokens is None


def test_message_lists_with_string_and_part_content() -> None:
    replayed = message_item("msg_1", "assistant", "Earlier.", output=True)  # a prior output
    body = _req(
        input=[
            {"role": "developer", "content": "Be brief."},
            {"type": "message", "role": "system", "content": "System."},
            {"role": "user", "content": [
                {"type": "input_text", "text": "Hel"}, {"type": "input_text", "text": "lo"},
            ]},
            replayed,
            {"role": "assistant", "content": [{"type": "output_text", "text": "Yes."}],
             "phase": None, "status": None},
        ],
        instructions="Speak French.", temperature=0.2, top_p=0.5, max_output_tokens=7,
        metadata={"k": "v"}, user="u1", service_tier="default", stream=True,
    )  # fmt: skip
    req = parse_responses_request(body)
    assert req.messages() == [
        InputMessage("developer", "Be brief."),
        InputMessage("system", "System."),
        InputMessage("user", "Hello"),
        InputMessage("assistant", "Earlier."),
        InputMessage("assistant", "Yes."),
    ]
    assert req.sampling() == {"temperature": 0.2, "top_p": 0.5}
    assert (req.instructions, req.max_output_tokens) == ("Speak French.", 7)
    assert req.metadata == {"k": "v"}
    assert (req.user, req.service_tier, req.stream) == ("u1", "default", True)


@pytest.mark.parametrize("conversation", ["conv_1", {"id": "conv_1"}])
def test_conversation_is_normalized_to_its_id(conversation: Any) -> None:
    assert parse_responses_request(_req(conversation=conversation)).conversation_id == "conv_1"


def test_null_and_not_used_values_are_accepted() -> None:
    nulls = dict.fromkeys(
        ["store", "stream", "temperature", "top_p", "metadata", "instructions", "tools",
         "reasoning", "include", "background", "conversation", "previous_response_id",
         "service_tier", "truncation", "text", "user", "stream_options", "top_logprobs"]
    )  # fmt: skip
    req = parse_responses_request(_req(**nulls))
    assert (req.store, req.stream, req.metadata, req.truncation) == (True, False, None, "disabled")
    unused = dict(
        tools=[], tool_choice="auto", include=[], background=False, top_logprobs=0,
        truncation="disabled", text={"format": {"type": "text"}}, parallel_tool_calls=False,
        reasoning={"effort": None, "summary": None}, stream=True,
        stream_options={"include_obfuscation": False}, store=False,
        metadata={f"k{i}": "v" * 512 for i in range(16)},
    )  # fmt: skip
    assert parse_responses_request(_req(**unused)).store is False
    assert parse_responses_request(_req(tool_choice="none")).messages()[0].text == "hi"


BAD_REQUESTS: list[tuple[dict[str, Any], str, str | None]] = [
    ({"model": None}, "model", None),
    ({"input": None}, "input", None),
    ({"input": ""}, "input", None),
    ({"input": []}, "input", None),
    ({"foo": 1}, "foo", None),
    ({"temperature": "0.5"}, "temperature", None),
    ({"temperature": 2.5}, "temperature", None),
    ({"top_p": 0}, "top_p", None),
    ({"top_p": 1.5}, "top_p", None),
    ({"max_output_tokens": 0}, "max_output_tokens", None),
    ({"max_output_tokens": "8"}, "max_output_tokens", None),
    ({"stream": "yes"}, "stream", None),
    ({"store": 1}, "store", None),
    ({"service_tier": "flex"}, "service_tier", None),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", None),
    ({"metadata": {"k" * 65: "v"}}, "metadata", None),
    ({"metadata": {"k": "v" * 513}}, "metadata", None),
    ({"metadata": {"k": 1}}, "metadata", None),
    ({"metadata": ["k"]}, "metadata", None),
    ({"truncation": "auto"}, "truncation", "unsupported_parameter"),
    ({"truncation": "sometimes"}, "truncation", None),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {}}}},
     "text.format", "unsupported_parameter"),
    ({"text": {"format": {"type": "json_object"}}}, "text.format", "unsupported_parameter"),
    ({"text": {"format": {"type": "yaml"}}}, "text.format", "invalid_value"),
    ({"text": {"verbosity": "low"}}, "text.verbosity", "unsupported_parameter"),
    ({"text": {"colour": "red"}}, "text.colour", None),
    ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools",
     "unsupported_parameter"),
    ({"tool_choice": "required"}, "tool_choice", "unsupported_parameter"),
    ({"tool_choice": {"type": "function", "name": "f"}}, "tool_choice", "unsupported_parameter"),
    ({"reasoning": {"effort": "high"}}, "reasoning", "unsupported_parameter"),
    ({"include": ["reasoning.encrypted_content"]}, "include", "unsupported_parameter"),
    ({"background": True}, "background", "unsupported_parameter"),
    ({"background": 0}, "background", "unsupported_parameter"),  # not `false`
    ({"prompt": {"id": "pmpt_1"}}, "prompt", "unsupported_parameter"),
    ({"top_logprobs": 5}, "top_logprobs", "unsupported_parameter"),
    ({"max_tool_calls": 3}, "max_tool_calls", "unsupported_parameter"),
    ({"prompt_cache_key": "k"}, "prompt_cache_key", "unsupported_parameter"),
    ({"safety_identifier": "s"}, "safety_identifier", "unsupported_parameter"),
    ({"stream_options": {"include_obfuscation": True}}, "stream_options", None),
    ({"stream": True, "stream_options": {"include_usage": True}},
     "stream_options.include_usage", None),
    ({"previous_response_id": "resp_1", "conversation": "conv_1"}, "previous_response_id", None),
    ({"conversation": {"id": ""}}, "conversation.id", None),
    ({"conversation": 5}, "conversation", None),
    ({"conversation": ""}, "conversation", None),
    ({"previous_response_id": ""}, "previous_response_id", None),
]  # fmt: skip


@pytest.mark.parametrize(("fields", "param", "code"), BAD_REQUESTS)
def test_bad_requests_are_400_naming_the_parameter(
    fields: dict[str, Any], param: str, code: str | None
) -> None:
    body = {k: v for k, v in _req(**fields).items() if v is not None}
    error = _error(parse_responses_request, body)
    assert (error.status, error.param, error.code) == (400, param, code)
    assert f"'{param}'" in error.message or error.message.endswith(param)


def test_every_unsupported_parameter_is_refused_by_name() -> None:
    for name in UNSUPPORTED:
        error = _error(parse_responses_request, _req(**{name: {"set": True}}))
        assert (error.param, error.code) == (name, "unsupported_parameter"), name
        assert "not supported" in error.message


def test_previous_response_and_conversation_together_say_so() -> None:
    error = _error(parse_responses_request, _req(previous_response_id="r", conversation="c"))
    assert "cannot be used together" in error.message


def _item_error(items: list[Any]) -> OpenAIError:
    return _error(parse_responses_request, _req(input=items))


OK_ITEM = {"role": "user", "content": "ok"}
BAD_ITEMS: list[tuple[list[Any], str, str | None]] = [
    ([OK_ITEM, OK_ITEM, {"role": "user", "content": [{"type": "input_image", "image_url": "u",
      "detail": "auto"}]}], "input[2].content[0]", "unsupported_parameter"),
    ([{"role": "user", "content": [{"type": "input_text", "text": "a"},
      {"type": "input_file", "file_id": "f"}]}], "input[0].content[1]", "unsupported_parameter"),
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}],
     "input[0].content[0]", "unsupported_parameter"),
    ([{"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]}],
     "input[0].content[0]", "unsupported_parameter"),
    ([OK_ITEM, {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}],
     "input[1]", "unsupported_parameter"),
    ([{"type": "function_call_output", "call_id": "c", "output": "x"}], "input[0]",
     "unsupported_parameter"),
    ([{"type": "reasoning", "id": "rs_1", "summary": []}], "input[0]", "unsupported_parameter"),
    ([{"type": "item_reference", "id": "msg_1"}], "input[0]", "unsupported_parameter"),
    ([{"id": "msg_1"}], "input[0]", "unsupported_parameter"),  # a reference without a type
    ([{"type": "web_search_call", "id": "ws"}], "input[0]", "unsupported_parameter"),
    ([{"type": "bogus", "role": "user", "content": "x"}], "input[0].type", "invalid_value"),
    ([{"type": 3, "role": "user", "content": "x"}], "input[0].type", "invalid_value"),
    (["just text"], "input[0]", None),
    ([{"role": "tool", "content": "x"}], "input[0].role", None),
    ([{"role": "user"}], "input[0].content", None),
    ([{"content": "x"}], "input[0].role", None),
    ([{"role": "user", "content": "x", "name": "bob"}], "input[0].name", None),
    ([{"role": "user", "content": []}], "input[0].content", None),
    ([{"role": "user", "content": 5}], "input[0].content", None),
    ([{"role": "user", "content": ["text"]}], "input[0].content[0]", None),
    ([{"role": "assistant", "content": [{"type": "input_text", "text": "x"}]}],
     "input[0].content[0].type", "invalid_value"),
    ([{"role": "user", "content": [{"type": "output_text", "text": "x"}]}],
     "input[0].content[0].type", "invalid_value"),
    ([{"role": "user", "content": [{"type": "input_text"}]}], "input[0].content[0].text", None),
    ([{"role": "user", "content": [{"type": "input_text", "text": 5}]}],
     "input[0].content[0].text", None),
    ([{"role": "user", "content": [{"type": "input_text", "text": "x", "extra": 1}]}],
     "input[0].content[0].extra", None),
    ([{"role": "user", "content": [{"type": "input_text", "text": "x",
      "prompt_cache_breakpoint": {"mode": "explicit"}}]}],
     "input[0].content[0].prompt_cache_breakpoint", "unsupported_parameter"),
    ([{"role": "user", "status": "done", "content": "x"}], "input[0].status", None),
]  # fmt: skip


@pytest.mark.parametrize(("items", "param", "code"), BAD_ITEMS)
def test_bad_input_items_name_their_position(
    items: list[Any], param: str, code: str | None
) -> None:
    error = _item_error(items)
    assert (error.status, error.param, error.code) == (400, param, code)
    assert param in error.message or "not supported" in error.message


def test_item_errors_say_what_is_wrong() -> None:
    assert "multimodal" in _item_error(BAD_ITEMS[0][0]).message
    assert "'function_call' are not supported" in _item_error(BAD_ITEMS[4][0]).message
    unknown = _item_error([{"role": "user", "content": "x", "name": "bob"}])
    assert unknown.message == "Unrecognized request argument supplied: input[0].name"


def test_a_body_that_is_not_an_object_is_400() -> None:
    error = _error(parse_responses_request, ["model"])
    assert (error.status, error.param) == (400, None)


# ---- parsing the Conversations API ------------------------------------------------------
def test_conversation_create_items_and_metadata() -> None:
    req = parse_conversation_create(
        {"items": [{"role": "user", "content": "hi"},
                   {"role": "assistant", "content": [{"type": "output_text", "text": "yo"}]}],
         "metadata": {"topic": "x"}}
    )  # fmt: skip
    assert req.messages == [InputMessage("user", "hi"), InputMessage("assistant", "yo")]
    assert req.metadata == {"topic": "x"}
    stored = req.stored_items()
    assert all(isinstance(s, StoredItem) and s.item["id"] == s.id for s in stored)
    assert stored[0].id.startswith("msg_") and stored[0].id != stored[1].id
    user, assistant = (CONV_ITEM.validate_python(s.item) for s in stored)
    assert user.content[0].type == "input_text" and assistant.content[0].type == "output_text"
    assert parse_conversation_create({}).messages == []
    assert parse_conversation_create({"items": None, "metadata": None}).metadata == {}


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"items": [{"role": "user", "content": "x"}] * 21}, "items", None),
        ({"items": [{"role": "user", "content": [{"type": "input_image"}]}]},
         "items[0].content[0]", "unsupported_parameter"),
        ({"items": [{"type": "function_call_output"}]}, "items[0]", "unsupported_parameter"),
        ({"metadata": {"k": 1}}, "metadata", None),
        ({"name": "x"}, "name", None),
    ],
)  # fmt: skip
def test_conversation_create_refusals(body: dict[str, Any], param: str, code: str | None) -> None:
    error = _error(parse_conversation_create, body)
    assert (error.status, error.param, error.code) == (400, param, code)


def test_conversation_update_requires_metadata() -> None:
    assert parse_conversation_update({"metadata": {"a": "b"}}).metadata == {"a": "b"}
    assert parse_conversation_update({"metadata": None}).metadata == {}
    missing = _error(parse_conversation_update, {})
    assert missing.param == "metadata"
    assert missing.message == "Missing required parameter: 'metadata'."
    assert _error(parse_conversation_update, {"metadata": {}, "x": 1}).param == "x"
    assert _error(parse_conversation_update, {"metadata": {"k": "v" * 513}}).param == "metadata"


def test_items_create() -> None:
    req = parse_items_create({"items": [{"role": "user", "content": "x"}]})
    assert req.messages == [InputMessage("user", "x")] and len(req.stored_items()) == 1
    for body, param, code in [
        ({"items": []}, "items", None),
        ({}, "items", None),
        ({"items": [{"role": "user", "content": "x"}] * 21}, "items", None),
        ({"items": [{"role": "user", "content": "x"}], "include": ["x"]}, "include",
         "unsupported_parameter"),
        ({"items": [{"role": "assistant", "content": [{"type": "input_text", "text": "x"}]}]},
         "items[0].content[0].type", "invalid_value"),
    ]:  # fmt: skip
        error = _error(parse_items_create, body)
        assert (error.status, error.param, error.code) == (400, param, code), body


def test_list_params() -> None:
    assert parse_list_params({}) == ListParams(None, 20, "desc")
    assert parse_list_params({"after": "msg_1", "limit": "100", "order": "asc"}) == ListParams(
        "msg_1", 100, "asc"
    )
    assert parse_list_params({"limit": "1", "other": "x"}).limit == 1
    for query, param in [
        ({"limit": "0"}, "limit"), ({"limit": "101"}, "limit"), ({"limit": "ten"}, "limit"),
        ({"limit": ""}, "limit"), ({"limit": "-1"}, "limit"), ({"limit": "²"}, "limit"),
        ({"order": "up"}, "order"), ({"after": ""}, "after"),
        ({"include": "x"}, "include"), ({"include[]": "x"}, "include"),
    ]:  # fmt: skip
        error = _error(parse_list_params, query)
        assert (error.status, error.param) == (400, param), query
    assert _error(parse_list_params, {"include[]": "x"}).code == "unsupported_parameter"


# ---- rendering --------------------------------------------------------------------------
def _draft(**fields: Any) -> ResponseDraft:
    base: dict[str, Any] = dict(
        id="resp_1", created_at=1700000000, model="m", message_id="msg_out",
        instructions="Be kind.", previous_response_id=None, conversation_id="conv_1",
        store=True, service_tier="shared", metadata={"k": "v"}, temperature=0.7, top_p=1.0,
        max_output_tokens=64, user="u1",
    )  # fmt: skip
    return ResponseDraft(**{**base, **fields})


def _finish(d: ResponseDraft, status: str = "completed", text: str = "Hello world") -> None:
    d.text, d.status = text, status
    d.input_tokens, d.cached_tokens, d.output_tokens = 10, 4, 3


def _openai_tier(payload: dict[str, Any]) -> dict[str, Any]:
    """The SDK's types know only OpenAI's tier names; its client parses ours ("shared",
    "dedicated", as chat answers) leniently (see the client tests below)."""
    return {**payload, "service_tier": "default"}


def _sdk_response(body: dict[str, Any]) -> oa.Response:
    assert body["service_tier"] == "shared"
    return oa.Response.model_validate(_openai_tier(body))


def test_response_in_progress_has_no_output_and_no_usage() -> None:
    body = response_object(_draft())
    sdk = _sdk_response(body)
    assert (sdk.status, sdk.output, sdk.usage, sdk.completed_at) == ("in_progress", [], None, None)
    assert sdk.conversation is not None and sdk.conversation.id == "conv_1"
    assert (sdk.instructions, sdk.metadata, sdk.store, sdk.truncation) == (
        "Be kind.", {"k": "v"}, True, "disabled",
    )  # fmt: skip
    assert body["text"] == {"format": {"type": "text"}} and body["tools"] == []


def test_completed_response() -> None:
    d = _draft(conversation_id=None, previous_response_id="resp_0")
    _finish(d)
    body = response_object(d)
    sdk = _sdk_response(body)
    assert (sdk.status, sdk.output_text, sdk.error, sdk.incomplete_details) == (
        "completed", "Hello world", None, None,
    )  # fmt: skip
    assert (sdk.conversation, sdk.previous_response_id) == (None, "resp_0")
    message = sdk.output[0]
    assert isinstance(message, oa.ResponseOutputMessage)
    assert (message.id, message.status, message.role) == ("msg_out", "completed", "assistant")
    assert message.content[0].type == "output_text" and message.content[0].annotations == []
    assert sdk.usage is not None
    assert (sdk.usage.input_tokens, sdk.usage.output_tokens, sdk.usage.total_tokens) == (10, 3, 13)
    details = sdk.usage.input_tokens_details
    assert (details.cached_tokens, details.cache_write_tokens) == (4, 6)
    assert sdk.usage.output_tokens_details.reasoning_tokens == 0
    assert body["completed_at"] is not None and response_object(d) == body  # stamped once


def test_incomplete_failed_and_cancelled_responses() -> None:
    d = _draft()
    _finish(d, "incomplete", "Hello wor")
    d.incomplete_reason = "max_output_tokens"
    sdk = _sdk_response(response_object(d))
    assert sdk.incomplete_details is not None
    assert sdk.incomplete_details.reason == "max_output_tokens" and sdk.completed_at is None
    assert sdk.output[0].status == "incomplete" and sdk.output_text == "Hello wor"

    failed = _draft(status="failed", error={"code": "model_unavailable", "message": "Try later."})
    sdk = _sdk_response(response_object(failed))
    assert sdk.error is not None and sdk.output == [] and sdk.usage is not None
    assert (sdk.error.code, sdk.error.message) == ("server_error", "Try later.")
    limited = _draft(status="failed", error={"code": "rate_limit_exceeded", "message": "Slow."})
    assert response_object(limited)["error"]["code"] == "rate_limit_exceeded"
    assert response_object(_draft(status="failed"))["error"] == {
        "code": "server_error", "message": ro.DEFAULT_ERROR_MESSAGE,
    }  # fmt: skip

    cancelled = _draft(status="cancelled", text="Hel")
    sdk = _sdk_response(response_object(cancelled))
    assert sdk.status == "cancelled" and sdk.output[0].status == "incomplete"
    assert response_object(_draft(status="cancelled"))["output"] == []


def test_message_items_match_the_sdk_item_types() -> None:
    user = message_item("msg_u", "user", "hi", output=False)
    assert user == {
        "type": "message", "id": "msg_u", "role": "user", "status": "completed",
        "content": [{"type": "input_text", "text": "hi"}],
    }  # fmt: skip
    assert isinstance(ITEM.validate_python(user), oa.ResponseInputMessageItem)
    said = message_item("msg_a", "assistant", "yo", output=True)
    assert said["content"] == [
        {"type": "output_text", "text": "yo", "annotations": [], "logprobs": []}
    ]
    assert isinstance(ITEM.validate_python(said), oa.ResponseOutputMessage)
    for item in (user, said, message_item("msg_d", "developer", "x", output=False)):
        assert isinstance(CONV_ITEM.validate_python(item), oa_conv.Message)


def _frames(frames: list[str]) -> list[dict[str, Any]]:
    """Each SSE frame -> its data, checking the frame's shape and its event name."""
    events = []
    for frame in frames:
        head, data, blank = frame.split("\n", 2)
        assert blank == "\n" and head.startswith("event: ") and data.startswith("data: ")
        event = json.loads(data.removeprefix("data: "))
        assert head == f"event: {event['type']}"
        if "response" in event:
            event = {**event, "response": _openai_tier(event["response"])}
        assert EVENT.validate_python(event).type == event["type"]
        events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


OPENING = [
    "response.created", "response.in_progress", "response.output_item.added",
    "response.content_part.added",
]  # fmt: skip
DONE = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]


def _stream(d: ResponseDraft, deltas: list[str], status: str) -> list[str]:
    events = ResponseEvents(d)
    frames = events.opening()
    for text in deltas:
        d.text += text
        frames.append(events.delta(text))
    d.status = status
    d.input_tokens, d.output_tokens = 5, len(deltas)
    if status == "incomplete":
        d.incomplete_reason = "max_output_tokens"
    return frames + (events.failed() if status == "failed" else events.closing())


def test_a_three_delta_stream() -> None:
    events = _frames(_stream(_draft(), ["Hel", "lo", "!"], "completed"))
    delta = ["response.output_text.delta"] * 3
    assert [e["type"] for e in events] == [*OPENING, *delta, *DONE, "response.completed"]
    created, in_progress = events[0]["response"], events[1]["response"]
    assert created["status"] == in_progress["status"] == "in_progress"
    assert created["output"] == [] and created["usage"] is None
    assert [e["delta"] for e in events[4:7]] == ["Hel", "lo", "!"]
    assert all(e["item_id"] == "msg_out" for e in events[3:9])
    assert events[2]["item"]["id"] == events[9]["item"]["id"] == "msg_out"
    assert events[7]["text"] == "Hello!" and events[8]["part"]["text"] == "Hello!"
    assert events[9]["item"]["status"] == "completed"
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["usage"]["output_tokens"] == 3
    assert final["output"][0]["content"][0]["text"] == "Hello!"


def test_incomplete_cancelled_and_failed_streams_end_with_their_event() -> None:
    events = _frames(_stream(_draft(), ["a", "b"], "incomplete"))
    assert [e["type"] for e in events][-4:] == [*DONE, "response.incomplete"]
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert events[-2]["item"]["status"] == "incomplete"

    events = _frames(_stream(_draft(), ["a"], "cancelled"))
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["status"] == "cancelled"

    d = _draft()
    d.error = {"code": "server_error", "message": "The model server failed."}
    events = _frames(_stream(d, ["par", "tial"], "failed"))
    assert [e["type"] for e in events] == [*OPENING, *["response.output_text.delta"] * 2,
                                           "response.failed"]  # fmt: skip
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["message"] == "The model server failed."
    assert failed["output"][0]["status"] == "incomplete"
    assert failed["output"][0]["content"][0]["text"] == "partial"


def test_events_open_once_and_refuse_to_close_an_unfinished_draft() -> None:
    d = _draft()
    events = ResponseEvents(d)
    assert len(events.opening()) == 4 and events.opening() == []
    with pytest.raises(ValueError, match="in_progress"):
        events.closing()
    alone = ResponseEvents(_draft(status="failed"))  # failing before anything was sent
    assert [e["type"] for e in _frames(alone.failed())] == [*OPENING, "response.failed"]
    d.status = "failed"  # closing() of a failed draft is its failure
    assert json.loads(events.closing()[-1].split("data: ", 1)[1])["sequence_number"] == 4


# ---- conversation objects ---------------------------------------------------------------
def test_conversation_objects_match_the_sdk() -> None:
    conv = oa_conv.Conversation.model_validate(conversation_object("conv_1", 17, {"a": "b"}))
    assert (conv.id, conv.created_at, conv.metadata, conv.object) == (
        "conv_1", 17, {"a": "b"}, "conversation",
    )  # fmt: skip
    assert conversation_object("conv_1", 17, None)["metadata"] == {}
    gone = oa_conv.ConversationDeletedResource.model_validate(conversation_deleted("conv_1"))
    assert (gone.id, gone.deleted, gone.object) == ("conv_1", True, "conversation.deleted")
    assert response_deleted("resp_1") == {"id": "resp_1", "object": "response.deleted",
                                          "deleted": True}  # fmt: skip


def test_item_lists_match_the_sdk_list_types() -> None:
    items = [
        message_item("msg_1", "user", "hi", output=False),
        message_item("msg_2", "assistant", "yo", output=True),
    ]
    body = item_list(items, has_more=True)
    conv_list = oa_conv.ConversationItemList.model_validate(body)
    assert (conv_list.first_id, conv_list.last_id, conv_list.has_more) == ("msg_1", "msg_2", True)
    response_list = oa.ResponseItemList.model_validate(body)
    assert [i.id for i in response_list.data] == ["msg_1", "msg_2"]
    empty = item_list([], has_more=False)
    assert empty == {"object": "list", "data": [], "first_id": None, "last_id": None,
                     "has_more": False}  # fmt: skip


# ---- the SDK's client over a mock transport ---------------------------------------------
class _Mock:
    """Answers every request with `reply`; keeps what the client sent."""

    def __init__(self, reply: httpx2.Response) -> None:
        self.reply, self.requests = reply, []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        return self.reply

    def client(self) -> openai.OpenAI:
        transport = httpx2.MockTransport(self)
        return openai.OpenAI(
            api_key="k", base_url="http://tiered/v1", http_client=httpx2.Client(transport=transport)
        )

    def sent(self) -> Any:
        return json.loads(self.requests[-1].content)


def _sse(frames: list[str]) -> httpx2.Response:
    return httpx2.Response(200, headers={"content-type": "text/event-stream"},
                           content="".join(frames).encode())  # fmt: skip


def test_the_sdk_client_sends_what_we_parse_and_reads_what_we_render() -> None:
    d = _draft()
    _finish(d)
    mock = _Mock(httpx2.Response(200, json=response_object(d)))
    response = mock.client().responses.create(
        model="m", input=[{"role": "developer", "content": "Be brief."},
                          {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
        instructions="x", conversation={"id": "conv_1"}, metadata={"a": "b"}, temperature=0.5,
        max_output_tokens=9, store=True, text={"format": {"type": "text"}}, tool_choice="auto",
    )  # fmt: skip
    assert response.output_text == "Hello world" and response.service_tier == "shared"
    req = parse_responses_request(mock.sent())
    assert req.conversation_id == "conv_1" and req.metadata == {"a": "b"}
    assert req.messages() == [InputMessage("developer", "Be brief."), InputMessage("user", "Hi")]


def test_the_sdk_stream_helper_accumulates_our_events() -> None:
    frames = _stream(_draft(), ["Hel", "lo", "!"], "completed")
    mock = _Mock(_sse(frames))
    with mock.client().responses.stream(model="m", input="hi") as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert final.output_text == "Hello!" and final.status == "completed"
    assert kinds[-1] == "response.completed" and kinds.count("response.output_text.delta") == 3
    assert parse_responses_request(mock.sent()).stream is True

    failed = _draft(error={"code": "server_error", "message": "boom"})
    mock = _Mock(_sse(_stream(failed, ["x"], "failed")))
    events = list(mock.client().responses.create(model="m", input="hi", stream=True))
    assert events[-1].type == "response.failed" and events[-1].response.error.message == "boom"


def test_the_sdk_client_reads_conversations_and_pages() -> None:
    mock = _Mock(httpx2.Response(200, json=conversation_object("conv_1", 3, {"a": "b"})))
    conv = mock.client().conversations.create(items=[{"role": "user", "content": "hi"}],
                                              metadata={"a": "b"})  # fmt: skip
    assert conv.id == "conv_1" and conv.metadata == {"a": "b"}
    assert parse_conversation_create(mock.sent()).messages == [InputMessage("user", "hi")]
    mock.client().conversations.items.create("conv_1", items=[{"role": "user", "content": "x"}])
    assert parse_items_create(mock.sent()).messages == [InputMessage("user", "x")]
    mock.client().conversations.update("conv_1", metadata={"b": "c"})
    assert parse_conversation_update(mock.sent()).metadata == {"b": "c"}

    empty = _Mock(httpx2.Response(200, json=item_list([], has_more=False)))
    page = empty.client().conversations.items.list("conv_1", limit=5, order="asc", after="m")
    assert page.data == [] and page.has_more is False
    query = dict(empty.requests[-1].url.params)
    assert parse_list_params(query) == ListParams("m", 5, "asc")
    empty.client().responses.input_items.list("resp_1", include=["message.input_image.image_url"])
    assert _error(parse_list_params, dict(empty.requests[-1].url.params)).param == "include"
