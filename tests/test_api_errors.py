"""Every failure a client can cause comes back as OpenAI's error JSON with the right status.

A small FastAPI app with install_error_handlers, driven by Starlette's TestClient (an
httpx.Client) and by the official openai SDK through that same client.
"""

from __future__ import annotations

import json

import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from ray.exceptions import RayTaskError

from deployments.api.errors import OpenAIError, install_error_handlers
from deployments.api.protocol import ChatCompletionRequest, parse_request, sampling_kwargs
from deployments.api.responses import ResponseBuilder
from deployments.tenancy.rate_limits import Limits, RateLimitState, too_many_requests
from models.errors import (
    ContextLengthExceededError,
    EngineDeadError,
    EngineOverloadedError,
    InvalidRequestError,
)
from models.outputs import CompletionDelta, Usage

LIMIT = 2048
JSON = {"content-type": "application/json"}
ENGINE_ERRORS = {
    "invalid": InvalidRequestError("'stop' strings must not be empty", "stop"),
    "context": ContextLengthExceededError("too long"),
    "overloaded": EngineOverloadedError("draining"),
    "dead": EngineDeadError("rank 1 died"),
    "wrapped": RayTaskError("generate", "traceback", EngineDeadError("rank 1 died")),
    "bug": RuntimeError("a bug"),
}


def _app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    app.state.max_body_bytes = LIMIT
    limiter = RateLimitState()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except json.JSONDecodeError:
            raise OpenAIError(400, "We could not parse the JSON body of your request.") from None
        req = parse_request("chat", body)
        decision = limiter.reserve("t", 1, Limits(rpm=2))
        if not decision.allowed:
            raise too_many_requests(decision, "t")
        kwargs = sampling_kwargs(req, req.requested_max_tokens() or 4)
        builder = ResponseBuilder("chat", "chatcmpl-1", req.model, "shared", req.n)
        for i in range(req.n):
            builder.add(CompletionDelta(i, f"max_tokens={kwargs['max_tokens']}", [1], None, "stop"))
        builder.usage = Usage(prompt_tokens=3, completion_tokens=req.n, cached_tokens=1)
        return builder.body()

    @app.post("/typed")
    async def typed(req: ChatCompletionRequest) -> dict:  # FastAPI's own validation
        return {"model": req.model}

    @app.get("/raise/{kind}")
    async def raise_(kind: str) -> dict:
        raise ENGINE_ERRORS[kind]

    return app


@pytest.fixture(scope="module")
def client() -> TestClient:
    return TestClient(_app(), raise_server_exceptions=False)


def sdk(client: TestClient) -> openai.OpenAI:
    return openai.OpenAI(
        base_url="http://testserver/v1", api_key="k", http_client=client, max_retries=0
    )


def error_of(response, status: int) -> dict:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


def test_the_sdk_round_trip_and_its_exception_classes(client: TestClient) -> None:
    c = sdk(client)
    messages = [{"role": "user", "content": "hi"}]
    resp = c.chat.completions.create(
        model="m", messages=messages, max_completion_tokens=7, max_tokens=3, n=2
    )
    assert resp.service_tier == "shared" and resp.choices[1].message.content == "max_tokens=7"
    assert resp.usage.prompt_tokens_details.cached_tokens == 1
    with pytest.raises(openai.BadRequestError) as err:
        tool = {"type": "function", "function": {"name": "f"}}
        c.chat.completions.create(model="m", messages=messages, tools=[tool])
    assert err.value.body["param"] == "tools" and err.value.code == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model="m", messages=messages, extra_body={"bogus": 1})
    assert err.value.body["param"] == "bogus"
    c.chat.completions.create(model="m", messages=messages)  # refusals above did not count
    with pytest.raises(openai.RateLimitError) as limited:
        c.chat.completions.create(model="m", messages=messages)  # the third in a minute
    headers = limited.value.response.headers
    assert int(headers["retry-after"]) >= 59 and int(headers["retry-after-ms"]) >= 59_000
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert limited.value.body["type"] == "requests"
    assert limited.value.code == "rate_limit_exceeded"


def test_malformed_and_non_object_json(client: TestClient) -> None:
    assert error_of(client.post("/v1/chat/completions", content=b"{not json"), 400)["param"] is None
    assert "JSON object" in error_of(client.post("/v1/chat/completions", json=[1]), 400)["message"]
    typed = error_of(client.post("/typed", content=b"{oops", headers=JSON), 400)
    assert "parse the JSON" in typed["message"]


def test_fastapi_validation_names_the_field_path(client: TestClient) -> None:
    body = {"model": "m", "messages": [{"role": "wizard", "content": "x"}]}
    error = error_of(client.post("/typed", json=body), 400)
    assert error["param"] == "messages.0.role" and error["type"] == "invalid_request_error"
    extra = error_of(client.post("/typed", json={**body, "bogus": 1}), 400)
    assert extra["param"] == "bogus" and "Unrecognized request argument" in extra["message"]
    stop = error_of(client.post("/typed", json={"model": "m", "messages": [], "stop": [1]}), 400)
    assert stop["param"] in ("messages", "stop.0")


def test_unknown_routes_and_methods(client: TestClient) -> None:
    missing = error_of(client.get("/v1/nowhere"), 404)
    assert missing["code"] == "unknown_url" and "/v1/nowhere" in missing["message"]
    wrong = client.get("/v1/chat/completions")
    assert error_of(wrong, 405) and wrong.headers["allow"] == "POST"


def test_bodies_over_the_limit_get_413_before_they_are_read(client: TestClient) -> None:
    big = b"x" * (LIMIT + 1)
    assert (
        error_of(client.post("/v1/chat/completions", content=big), 413)["code"]
        == "request_too_large"
    )

    def chunked():  # no Content-Length: counted as it arrives
        for _ in range(4):
            yield b"y" * (LIMIT // 2)

    assert error_of(client.post("/v1/chat/completions", content=chunked()), 413)
    body = {"model": "m", "messages": [{"role": "user", "content": "z" * 100}]}

    def small():
        yield json.dumps(body).encode()

    assert client.post("/typed", content=small(), headers=JSON).status_code == 200


@pytest.mark.parametrize(
    ("kind", "status", "param", "code"),
    [
        ("invalid", 400, "stop", "invalid_value"),
        ("context", 400, "messages", "context_length_exceeded"),
        ("overloaded", 503, None, "model_unavailable"),
        ("dead", 503, None, "model_unavailable"),
        ("wrapped", 503, None, "model_unavailable"),
        ("bug", 500, None, None),
    ],
)
def test_engine_errors_map_to_status(
    client: TestClient, kind: str, status: int, param: str | None, code: str | None
) -> None:
    response = client.get(f"/raise/{kind}")
    error = error_of(response, status)
    assert (error["param"], error["code"]) == (param, code)
    if status == 503:
        assert response.headers["retry-after"] == "1"
    if kind == "bug":
        assert "a bug" not in error["message"]  # internals stay inside
