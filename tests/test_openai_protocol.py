"""Request schemas: what parses, what is refused and by which param; response shapes."""

from __future__ import annotations

import json

import openai.types as oa
import openai.types.chat as oa_chat
import pytest

from deployments.api.errors import OpenAIError
from deployments.api.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    parse_request,
    sampling_kwargs,
)
from deployments.api.responses import ResponseBuilder
from models.outputs import CompletionDelta, TokenLogprob, Usage
from models.sampling_params import SamplingParams

USER = [{"role": "user", "content": "hi"}]
UNSUPPORTED, UNSUPPORTED_VALUE = "unsupported_parameter", "unsupported_value"


def says(content: object) -> dict:
    """A body whose one user message has `content`."""
    return {"messages": [{"role": "user", "content": content}]}


def chat(**fields: object) -> ChatCompletionRequest:
    req = parse_request("chat", {"model": "m", "messages": USER, **fields})
    assert isinstance(req, ChatCompletionRequest)
    return req


def completion(**fields: object) -> CompletionRequest:
    req = parse_request("completion", {"model": "m", "prompt": "hi", **fields})
    assert isinstance(req, CompletionRequest)
    return req


def refused(kind: str, body: dict) -> OpenAIError:
    base = {"model": "m", "messages": USER} if kind == "chat" else {"model": "m", "prompt": "x"}
    with pytest.raises(OpenAIError) as err:
        parse_request(kind, {**base, **body})  # type: ignore[arg-type]
    assert err.value.status == 400 and err.value.type == "invalid_request_error"
    return err.value


def test_text_parts_and_every_role_but_tools() -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {
            "role": "developer",
            "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
        },
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "go", "name": "alice"},
    ]
    req = chat(messages=messages)
    assert [m.text() for m in req.messages] == ["be brief", "ab", "ok", "go"]


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert chat(max_tokens=5, max_completion_tokens=9).requested_max_tokens() == 9
    assert chat(max_tokens=5).requested_max_tokens() == 5
    assert chat().requested_max_tokens() is None
    assert completion().requested_max_tokens() == 16  # OpenAI's completions default


def test_explicit_nulls_mean_the_default() -> None:
    req = chat(n=None, stream=None, presence_penalty=None, logprobs=None, stop=None, seed=None)
    assert req.n == 1 and req.stream is False and req.logprobs is False


def test_sampling_kwargs_build_valid_engine_params() -> None:
    req = chat(
        temperature=0.5,
        top_p=0.9,
        n=2,
        stop="END",
        seed=7,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        logprobs=True,
        top_logprobs=3,
    )
    kw = sampling_kwargs(req, 12)
    params = SamplingParams(**kw)
    assert (params.max_tokens, params.n, params.stop, params.logprobs) == (12, 2, ["END"], 3)
    assert (params.temperature, params.top_p, params.seed) == (0.5, 0.9, 7)
    assert sampling_kwargs(chat(logprobs=True), 1)["logprobs"] == 0  # chosen token only
    assert sampling_kwargs(chat(), 1)["logprobs"] is None
    assert sampling_kwargs(completion(logprobs=2, stop=["a", "b"]), 4)["logprobs"] == 2
    assert SamplingParams(**sampling_kwargs(chat(), 1)).temperature == 1.0
    assert SamplingParams(**sampling_kwargs(chat(ignore_eos=True), 3)).ignore_eos is True
    assert sampling_kwargs(chat(), 1)["ignore_eos"] is False


@pytest.mark.parametrize(
    ("kind", "body", "param", "code"),
    [
        ("chat", {"tools": [{"type": "function"}]}, "tools", UNSUPPORTED),
        ("chat", {"tool_choice": "auto"}, "tool_choice", UNSUPPORTED),
        ("chat", {"functions": [{"name": "f"}]}, "functions", UNSUPPORTED),
        ("chat", {"function_call": "auto"}, "function_call", UNSUPPORTED),
        ("chat", {"parallel_tool_calls": True}, "parallel_tool_calls", UNSUPPORTED),
        ("chat", {"audio": {"voice": "x"}}, "audio", UNSUPPORTED),
        ("chat", {"modalities": ["text", "audio"]}, "modalities", UNSUPPORTED),
        ("chat", {"prediction": {"type": "content"}}, "prediction", UNSUPPORTED),
        ("chat", {"logit_bias": {"42": 3}}, "logit_bias", UNSUPPORTED),
        (
            "chat",
            {"response_format": {"type": "json_schema"}},
            "response_format",
            UNSUPPORTED_VALUE,
        ),
        (
            "chat",
            {"response_format": {"type": "json_object"}},
            "response_format",
            UNSUPPORTED_VALUE,
        ),
        (
            "chat",
            says([{"type": "image_url", "image_url": {"url": "x"}}]),
            "messages.0.content.0.type",
            UNSUPPORTED_VALUE,
        ),
        (
            "chat",
            says([{"type": "text", "text": "a"}, {"type": "input_audio"}]),
            "messages.0.content.1.type",
            UNSUPPORTED_VALUE,
        ),
        (
            "chat",
            {"messages": [*USER, {"role": "tool", "content": "r", "tool_call_id": "c"}]},
            "messages.1.role",
            UNSUPPORTED_VALUE,
        ),
        (
            "chat",
            {"messages": [{"role": "assistant", "tool_calls": [{"id": "c"}]}]},
            "messages.0.tool_calls",
            UNSUPPORTED,
        ),
        ("completion", {"echo": True}, "echo", UNSUPPORTED),
        ("completion", {"best_of": 3}, "best_of", UNSUPPORTED),
        ("completion", {"suffix": "end"}, "suffix", UNSUPPORTED),
    ],
)
def test_known_but_unsupported_features_are_refused_by_name(
    kind: str, body: dict, param: str, code: str
) -> None:
    err = refused(kind, body)
    assert (err.param, err.code) == (param, code), err.message
    assert "not supported" in err.message


def test_harmless_values_of_unsupported_params_pass() -> None:
    chat(tool_choice="none", response_format={"type": "text"}, store=False, metadata={})
    completion(best_of=1, echo=False, suffix="")


@pytest.mark.parametrize(
    ("kind", "body", "param"),
    [
        ("chat", {"bogus": 1}, "bogus"),
        ("chat", {"messages": [{"role": "user", "content": "x", "extra": 1}]}, "messages.0.extra"),
        ("chat", {"messages": "hi"}, "messages"),
        ("chat", {"messages": []}, "messages"),
        ("chat", {"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ("chat", {"messages": [{"role": "user"}]}, "messages.0.content"),
        ("chat", says([]), "messages.0.content"),
        ("chat", says([{"type": "text", "text": 5}]), "messages.0.content.0.text"),
        ("chat", says([{"type": "video"}]), "messages.0.content.0.type"),
        ("chat", {"max_tokens": "8"}, "max_tokens"),
        ("chat", {"max_tokens": 0}, "max_tokens"),
        ("chat", {"max_completion_tokens": -1}, "max_completion_tokens"),
        ("chat", {"temperature": 2.5}, "temperature"),
        ("chat", {"temperature": "hot"}, "temperature"),
        ("chat", {"top_p": 0}, "top_p"),
        ("chat", {"n": 0}, "n"),
        ("chat", {"n": True}, "n"),
        ("chat", {"stop": [1]}, "stop.0"),
        ("chat", {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ("chat", {"seed": 2**64}, "seed"),
        ("chat", {"presence_penalty": 3}, "presence_penalty"),
        ("chat", {"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ("chat", {"logprobs": 3}, "logprobs"),
        ("chat", {"service_tier": "flex"}, "service_tier"),
        ("chat", {"service_tier": "dedicated"}, "service_tier"),
        ("chat", {"stream_options": {"include_usage": True}}, "stream_options"),
        (
            "chat",
            {"stream": True, "stream_options": {"include_usage": "yes"}},
            "stream_options.include_usage",
        ),
        ("chat", {"model": ""}, "model"),
        ("chat", {"user": "u" * 300}, "user"),
        ("completion", {"prompt": []}, "prompt"),
        ("completion", {"prompt": [[1, 2]]}, "prompt.0"),
        ("completion", {"logprobs": 6}, "logprobs"),
        ("completion", {"logprobs": True}, "logprobs"),
        ("completion", {"max_completion_tokens": 5}, "max_completion_tokens"),
    ],
)
def test_invalid_values_name_the_param(kind: str, body: dict, param: str) -> None:
    err = refused(kind, body)
    assert err.param == param, err.message
    assert param.split(".")[0] in err.message


def test_missing_required_fields_and_non_objects() -> None:
    assert refused("chat", {"model": None}).param == "model"
    with pytest.raises(OpenAIError) as err:
        parse_request("chat", {"messages": USER})
    assert err.value.param == "model" and "Missing required parameter" in err.value.message
    with pytest.raises(OpenAIError) as err:
        parse_request("chat", [1, 2])
    assert err.value.status == 400 and err.value.param is None


def test_checks_that_need_more_than_the_schema() -> None:
    assert refused("chat", {"top_logprobs": 2}).param == "top_logprobs"  # needs logprobs
    with pytest.raises(OpenAIError) as batched:
        completion(prompt=["a", "b"]).single_prompt()
    assert batched.value.param == "prompt" and batched.value.code == "unsupported_parameter"
    assert completion(prompt=["only"]).single_prompt() == "only"
    assert completion(prompt=[1, 2, 3]).single_prompt() == [1, 2, 3]
    with pytest.raises(OpenAIError):
        completion(prompt="").single_prompt()


def _builder(kind: str, n: int = 1) -> ResponseBuilder:
    b = ResponseBuilder(kind, "id-1", "m", "shared", n)
    lp = [TokenLogprob(5, "Hi", -0.1, [(5, "Hi", -0.1), (6, "Yo", -2.0)])]
    for i in range(n):
        b.add(CompletionDelta(i, "Hi", [5], lp, "length" if i else "stop"))
    b.usage = Usage(prompt_tokens=4, completion_tokens=n, cached_tokens=2)
    return b


def _as_openai_tier(payload: dict) -> dict:
    """The SDK's types know only OpenAI's tier names; its client parses ours leniently
    (tests/test_api.py), so the shape is checked here with the tier swapped."""
    return {**payload, "service_tier": "default"}


def test_response_models_match_what_the_ingress_sends_and_the_sdk_reads() -> None:
    body = _builder("chat", n=2).body()
    ours = ChatCompletion.model_validate(body)
    sdk = oa_chat.ChatCompletion.model_validate(_as_openai_tier(body))
    assert (
        ours.usage.prompt_tokens_details.cached_tokens
        == 2
        == sdk.usage.prompt_tokens_details.cached_tokens
    )
    assert [c.finish_reason for c in ours.choices] == ["stop", "length"]
    assert ours.service_tier == "shared" and sdk.choices[0].logprobs.content[0].top_logprobs
    text = _builder("completion").body()
    assert Completion.model_validate(text).choices[0].logprobs.tokens == ["Hi"]
    oa.Completion.model_validate(_as_openai_tier(text))


def test_stream_chunks_and_the_usage_chunk() -> None:
    b = _builder("chat")
    delta = CompletionDelta(0, "Hi", [5], None, None)
    events = [b.chunk([b.chunk_choice(delta, True, 0)], include_usage=True), b.usage_chunk()]
    payloads = [json.loads(e.removeprefix("data: ")) for e in events]
    first, last = (ChatCompletionChunk.model_validate(p) for p in payloads)
    assert first.choices[0].delta.role == "assistant" and first.usage is None
    assert last.choices == [] and last.usage.total_tokens == 5
    for p in payloads:
        oa_chat.ChatCompletionChunk.model_validate(_as_openai_tier(p))
