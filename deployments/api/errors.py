"""OpenAI's error format for every failure: {"error": {message, type, param, code}}.

Every path a client can trigger maps to a 4xx (or a 503 while the engine is unavailable)
here; only a bug reaches the 500 handler. 5xx bodies are fixed sentences: the exception
text (Ray reprs, paths, rank names) goes to the server log only. The body-size limit lives
here too, because a 413 must be answered before the body is read, in the same JSON shape.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from ray.exceptions import RayActorError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from models.errors import (
    ContextLengthExceededError,
    EngineDeadError,
    EngineOverloadedError,
    InvalidRequestError,
)

log = logging.getLogger(__name__)

UNAVAILABLE_RETRY_S = 1
DEAD_MESSAGE = "The model is temporarily unavailable; retry shortly."
OVERLOADED_MESSAGE = "The model server is overloaded; retry shortly."
SERVER_ERROR_MESSAGE = "The server had an error processing your request."

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}

# Names pydantic puts in an error location for union members ("str", "list[str]",
# "TextPart"); they are not request fields, so the param a client sees leaves them out.
_SCALAR_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "null"})

# Body limits by app title, per process. Not on app.state: @serve.ingress(app) serves a
# cloudpickled copy of the app made at import, so the ingress constructor, which knows the
# config, can only reach the module's original; the copy keeps the title and reads here.
_BODY_LIMITS: dict[str, int] = {}
_PATH_LIMITS: dict[str, dict[str, int]] = {}  # app title -> {path: its own limit}


class OpenAIError(Exception):
    """An error answered as OpenAI's JSON with `status`; raise it anywhere in a route."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.headers: dict[str, str] = dict(headers or {})

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self, extra_headers: Mapping[str, str] | None = None) -> JSONResponse:
        return JSONResponse(
            self.to_dict(), self.status, headers={**self.headers, **(extra_headers or {})}
        )


def unavailable(message: str, code: str = "model_unavailable") -> OpenAIError:
    """A 503 that tells the client when to come back."""
    retry = {"retry-after": str(UNAVAILABLE_RETRY_S), "retry-after-ms": "1000"}
    return OpenAIError(503, message, code=code, headers=retry)


def from_engine_error(exc: BaseException) -> OpenAIError | None:
    """Map a typed engine error (possibly wrapped by Ray) to its OpenAI error.

    400s carry the engine's message, which is written for the client. 503s carry a fixed
    sentence: an engine failure's text is internal, so it is logged here (once per call,
    at warning) and never sent.
    """
    cause: BaseException | None = exc
    for _ in range(4):  # Ray wraps user exceptions; walk to the typed one
        if cause is None:
            break
        if isinstance(cause, ContextLengthExceededError | InvalidRequestError):
            return OpenAIError(400, cause.message, param=cause.param, code=cause.code)
        if isinstance(cause, EngineOverloadedError | EngineDeadError):
            log.warning("engine unavailable, answering 503: %s: %s", type(cause).__name__, cause)
            overloaded = isinstance(cause, EngineOverloadedError)
            return unavailable(OVERLOADED_MESSAGE if overloaded else DEAD_MESSAGE)
        if isinstance(cause, RayActorError):  # the replica itself died under the request
            log.warning("model-server replica gone, answering 503: %s", type(cause).__name__)
            return unavailable(DEAD_MESSAGE)
        cause = getattr(cause, "cause", None) or cause.__cause__
    return None


def _constrained(tag: str) -> bool:
    """pydantic's tag for a constrained union member: "constrained-int", ...-float, ...-str."""
    return tag.startswith("constrained-")


def _param_path(loc: Sequence[Any]) -> str | None:
    """ "body.messages.0.content.list[...].0.text" -> "messages.0.content.0.text"."""
    parts = []
    for i, item in enumerate(loc):
        if i == 0 and item in ("body", "query", "path"):
            continue
        if isinstance(item, int):
            parts.append(str(item))
            continue
        text = str(item)
        if "[" in text or text in _SCALAR_TAGS or text[:1].isupper() or _constrained(text):
            continue  # a union member's tag, not a field
        parts.append(text)
    return ".".join(parts) or None


def _specificity(error: Mapping[str, Any]) -> tuple[int, bool]:
    """Deeper first; at equal depth a constraint beats "wrong type" (another union arm)."""
    path = _param_path(error.get("loc", ()))
    depth = 0 if path is None else path.count(".") + 1
    return depth, not str(error.get("type", "")).endswith("_type")


def from_validation_errors(errors: Sequence[Mapping[str, Any]]) -> OpenAIError:
    """Pydantic's errors as one 400: the most specific error wins and names the param."""
    if not errors:
        return OpenAIError(400, "Invalid request.")
    if any(e.get("type") == "json_invalid" for e in errors):
        return OpenAIError(400, "We could not parse the JSON body of your request.")
    extra = [e for e in errors if e.get("type") == "extra_forbidden"]
    # Unknown fields first (OpenAI's wording); else the deepest location, i.e. the
    # branch of a union that got furthest, rather than "should be a string".
    first = extra[0] if extra else max(errors, key=_specificity)
    param = _param_path(first.get("loc", ()))
    if first.get("type") == "extra_forbidden":
        return OpenAIError(400, f"Unrecognized request argument supplied: {param}", param=param)
    if first.get("type") == "missing":
        return OpenAIError(400, f"Missing required parameter: '{param}'.", param=param)
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return OpenAIError(400, f"Invalid value for '{param}': {message}", param=param)


def from_validation_error(exc: ValidationError | RequestValidationError) -> OpenAIError:
    return from_validation_errors(exc.errors())


Body = TypeVar("Body", bound=BaseModel)


def parse_body(model: type[Body], body: Any) -> Body:
    """A JSON body as `model`: anything else is a 400 naming the param."""
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def set_body_limit(
    app: FastAPI, max_body_bytes: int, per_path: Mapping[str, int] | None = None
) -> None:
    """Set the request-body cap of `app` and of every copy of it in this process.

    The only source of the limit: the ingress calls it from its config in __init__, after
    the module-level app was built. Until it is called every request gets a 500. Keyed by
    the app's title, so apps sharing a process need distinct titles. `per_path` gives
    exact paths their own cap (file uploads: the files size limit plus multipart framing).
    """
    key = getattr(app.state, "body_limit_key", None)
    if key is None:
        raise RuntimeError("call install_error_handlers(app) before set_body_limit")
    if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int):
        raise ValueError(f"max_body_bytes must be an int, not {max_body_bytes!r}")
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be positive, not {max_body_bytes}")
    _BODY_LIMITS[key] = max_body_bytes
    _PATH_LIMITS[key] = dict(per_path or {})


class BodySizeLimit:
    """Pure ASGI middleware: 413 for bodies over the limit `set_body_limit` gave `key`.

    The limit is read per request, so it can be set after the app was built (and pickled).
    With no limit set it refuses every request (500) instead of guessing one: a default
    silently capped larger configured limits, and no limit at all is unbounded memory.
    Bodies without Content-Length are counted as they arrive and replayed to the app once
    known to fit.
    """

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app, self.key = app, key
        self._warned = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = _BODY_LIMITS.get(self.key)
        if limit is not None:
            limit = _PATH_LIMITS.get(self.key, {}).get(scope.get("path", ""), limit)
        if limit is None:
            if not self._warned:
                self._warned = True
                log.error("no request-body limit for app %r: call set_body_limit", self.key)
            await send_error(OpenAIError(500, SERVER_ERROR_MESSAGE), scope, send)
            return
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                await send_error(OpenAIError(400, "invalid Content-Length header"), scope, send)
                return
            if int(length) > limit:
                await send_error(_too_large(limit), scope, send)
                return
            await self.app(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                chunks.append(message)  # a disconnect: pass it on
                break
            size += len(message.get("body", b""))
            if size > limit:
                await send_error(_too_large(limit), scope, send)
                return
            chunks.append(message)
            more = message.get("more_body", False)

        async def replay() -> Message:
            return chunks.pop(0) if chunks else await receive()

        await self.app(scope, replay, send)


def _too_large(limit: int) -> OpenAIError:
    return OpenAIError(413, f"request body exceeds {limit} bytes", code="request_too_large")


async def send_error(error: OpenAIError, scope: Scope, send: Send) -> None:
    """Answer `error` from ASGI middleware, before the app has read the body."""
    async def no_body() -> Message:
        return {"type": "http.disconnect"}

    await error.response()(scope, no_body, send)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error of `app` in OpenAI's format; install the body-size middleware,
    whose limit `set_body_limit` must then set (no default: it comes from the config)."""
    app.state.body_limit_key = app.title
    app.add_middleware(BodySizeLimit, key=app.title)

    @app.exception_handler(OpenAIError)
    async def _openai(_: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return from_validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"Invalid URL ({request.method} {request.url.path})"
            error = OpenAIError(404, message, type="invalid_request_error", code="unknown_url")
        elif exc.status_code == 405:
            error = OpenAIError(405, f"Method {request.method} not allowed for this URL.")
        else:
            error = OpenAIError(exc.status_code, str(exc.detail))
        return error.response(exc.headers)

    @app.exception_handler(InvalidRequestError)
    async def _engine_invalid(_: Request, exc: InvalidRequestError) -> JSONResponse:
        return OpenAIError(400, exc.message, param=exc.param, code=exc.code).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        mapped = from_engine_error(exc)
        if mapped is not None:
            return mapped.response()
        if type(exc).__name__ in ("TaskCancelledError", "CancelledError"):
            # The client went away and Serve cancelled the request; nobody reads this.
            return OpenAIError(499, "request cancelled", code="client_closed").response()
        log.exception("unhandled error")  # the text stays here; the client gets a sentence
        return OpenAIError(500, SERVER_ERROR_MESSAGE).response()


def state_unavailable() -> OpenAIError:
    """The state store is down: a 503 the client may retry, never a 500."""
    return OpenAIError(
        503,
        "The state store is unavailable; stored responses and conversations cannot be "
        "read or written right now. Retry shortly.",
        code="state_store_unavailable",
    )
