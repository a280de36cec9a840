"""Every failure a client can cause comes back as OpenAI's error JSON with the right status.

A small FastAPI app with install_error_handlers, driven by Starlette's TestClient (an
httpx.Client) and by the official openai SDK through that same client. The 429s of the
rate limiter itself (x-ratelimit-* headers) are tested with the limiter, not here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from ray import cloudpickle
from ray.exceptions import RayTaskError
from ray.serve._private.utils import ensure_serialization_context

from deployments.api.errors import (
    OpenAIError,
    from_engine_error,
    install_error_handlers,
    set_body_limit,
)
from deployments.api.protocol import ChatCompletionRequest, parse_request, sampling_kwargs
from deployments.api.responses import ResponseBuilder
from models.errors import (
    ContextLengthExceededError,
    EngineDeadError,
    EngineOverloadedError,
    InvalidRequestError,
)
from models.outputs import CompletionDelta, Usage

LIMIT = 2048
MIB = 1 << 20
JSON = {"content-type": "application/json"}
# What a rank exit really carries: a Ray actor error's repr, with paths and addresses.
SECRET = "rank 1 exited: RayActorError(ActorDiedError('/srv/tiered/secret-path/worker.py'))"
ENGINE_ERRORS = {
    "invalid": InvalidRequestError("'stop' strings must not be empty", "stop"),
    "context": ContextLengthExceededError("too long"),
    "overloaded": EngineOverloadedError("draining"),
    "dead": EngineDeadError("rank 1 died"),
    "wrapped": RayTaskError("generate", "traceback", EngineDeadError("rank 1 died")),
    "bug": RuntimeError("a bug"),
    "leaky_dead": EngineDeadError(SECRET),
    "leaky_overloaded": EngineOverloadedError(SECRET),
    "leaky_wrapped": RayTaskError("generate", SECRET, EngineDeadError(SECRET)),
    "leaky_bug": RuntimeError(SECRET),
    "leaky_wrapped_bug": RayTaskError("generate", SECRET, RuntimeError(SECRET)),
}


def _app() -> FastAPI:
    app = FastAPI(title="test_api_errors")
    install_error_handlers(app)
    set_body_limit(app, LIMIT)
    calls = {"n": 0}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except json.JSONDecodeError:
            raise OpenAIError(400, "We could not parse the JSON body of your request.") from None
        req = parse_request("chat", body)
        calls["n"] += 1
        if calls["n"] > 2:  # a stand-in for the limiter: the third request is refused
            retry = {"retry-after": "60", "retry-after-ms": "60000"}
            raise OpenAIError(429, "Rate limit reached.", code="rate_limit_exceeded", headers=retry)
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
    assert headers["retry-after"] == "60" and headers["retry-after-ms"] == "60000"
    assert limited.value.body["type"] == "rate_limit_error"
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


# ---- internal text stays in the server log ----------------------------------------------
@pytest.mark.parametrize(
    ("kind", "status", "level"),
    [
        ("leaky_dead", 503, logging.WARNING),
        ("leaky_overloaded", 503, logging.WARNING),
        ("leaky_wrapped", 503, logging.WARNING),
        ("leaky_bug", 500, logging.ERROR),
        ("leaky_wrapped_bug", 500, logging.ERROR),
    ],
)
def test_internal_error_text_never_reaches_the_client(
    client: TestClient, caplog: pytest.LogCaptureFixture, kind: str, status: int, level: int
) -> None:
    with caplog.at_level(logging.WARNING, logger="deployments.api.errors"):
        response = client.get(f"/raise/{kind}")
    error = error_of(response, status)
    for leak in ("secret-path", "RayActorError", "ActorDiedError", "rank 1"):
        assert leak not in response.text
    if status == 503:
        assert response.headers["retry-after"] == "1"
        assert error["code"] == "model_unavailable" and error["type"] == "service_unavailable"
        assert error["message"].endswith("retry shortly.")
    else:
        assert error["type"] == "server_error"
    logged = [r for r in caplog.records if "secret-path" in r.getMessage() + str(r.exc_info)]
    assert len(logged) == 1 and logged[0].levelno == level  # once, for the operator


def test_unavailable_messages_are_fixed_sentences() -> None:
    dead = from_engine_error(EngineDeadError(SECRET))
    overloaded = from_engine_error(EngineOverloadedError(SECRET))
    assert dead is not None and overloaded is not None
    assert dead.message == "The model is temporarily unavailable; retry shortly."
    assert overloaded.message == "The model server is overloaded; retry shortly."
    assert from_engine_error(RuntimeError(SECRET)) is None


# ---- the body limit is the configured one ------------------------------------------------
def _limited_app(title: str, limit: int | None) -> FastAPI:
    """Each test its own title: the limit is keyed by it, process-wide (see errors.py)."""
    app = FastAPI(title=title)
    install_error_handlers(app)
    if limit is not None:
        set_body_limit(app, limit)

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        return {"bytes": len(await request.body())}

    return app


def _body(size: int, chunked: bool) -> bytes | Iterator[bytes]:
    if not chunked:
        return b"x" * size  # httpx sends Content-Length

    def chunks() -> Iterator[bytes]:  # no Content-Length: Transfer-Encoding: chunked
        left = size
        while left:
            step = min(left, 64 * 1024)
            left -= step
            yield b"x" * step

    return chunks()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_configured_limit_above_the_old_default_is_honoured(chunked: bool) -> None:
    app = _limited_app(f"two-mib-{chunked}", 2 * MIB)
    client = TestClient(app, raise_server_exceptions=False)
    for size in (MIB + MIB // 2, 2 * MIB):
        response = client.post("/echo", content=_body(size, chunked))
        assert response.status_code == 200, response.text
        assert response.json() == {"bytes": size}
    for size in (2 * MIB + 1, 2 * MIB + MIB // 2):
        error = error_of(client.post("/echo", content=_body(size, chunked)), 413)
        assert error["code"] == "request_too_large" and str(2 * MIB) in error["message"]
        assert error["type"] == "invalid_request_error"


def test_the_limit_reaches_the_copy_serve_actually_serves() -> None:
    """@serve.ingress(app) serves cloudpickle.loads(dumps(app)), frozen at import; the
    ingress sets the limit in __init__ on the module's app, which is not that copy."""
    app = _limited_app("serve-copy", None)
    ensure_serialization_context()  # what serve.ingress does before it pickles the app
    served = cloudpickle.loads(cloudpickle.dumps(app))
    set_body_limit(app, 2 * MIB)
    client = TestClient(served, raise_server_exceptions=False)
    assert client.post("/echo", content=b"x" * (MIB + MIB // 2)).status_code == 200
    assert error_of(client.post("/echo", content=b"x" * (2 * MIB + 1)), 413)
    set_body_limit(app, 1024)  # later changes reach it too
    assert error_of(client.post("/echo", content=b"x" * 2048), 413)


def test_without_a_configured_limit_requests_are_refused_not_guessed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An ingress that forgot set_body_limit must fail loudly, not cap or accept anything."""
    client = TestClient(_limited_app("no-limit", None), raise_server_exceptions=False)
    with caplog.at_level(logging.ERROR, logger="deployments.api.errors"):
        for _ in range(3):
            error = error_of(client.post("/echo", content=b"{}"), 500)
            assert error["type"] == "server_error"
    assert len([r for r in caplog.records if "set_body_limit" in r.getMessage()]) == 1
    assert error_of(client.get("/nowhere"), 500)  # every HTTP request, not only bodies


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, None])
def test_set_body_limit_wants_a_positive_int(bad: object) -> None:
    app = FastAPI(title="bad-limit")
    install_error_handlers(app)
    with pytest.raises(ValueError, match="max_body_bytes"):
        set_body_limit(app, bad)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="install_error_handlers"):
        set_body_limit(FastAPI(title="never-installed"), 1024)


def test_the_limit_can_be_set_after_the_app_is_built() -> None:
    """The ingress builds the app at import and learns the limit in __init__."""
    app = _limited_app("set-later", 1024)
    client = TestClient(app, raise_server_exceptions=False)
    assert error_of(client.post("/echo", content=b"x" * 4096), 413)
    set_body_limit(app, 8192)
    assert client.post("/echo", content=b"x" * 4096).json() == {"bytes": 4096}
