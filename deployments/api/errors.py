"""OpenAI's error format for every failure: {"error": {message, type, param, code}}.

Every path a client can trigger maps to a 4xx (or a 503 while the engine is unavailable)
here; only a bug reaches the 500 handler. The body-size limit lives here too, because a
413 must be answered before the body is read, in the same JSON shape.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from models.errors import (
    ContextLengthExceededError,
    EngineDeadError,
    EngineOverloadedError,
    InvalidRequestError,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 1_048_576
UNAVAILABLE_RETRY_S = 1

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


def rate_limited(decision: dict, what: str) -> OpenAIError:
    """A 429 in OpenAI's shape, with Retry-After and the rate-limit headers."""
    retry = max(1, math.ceil(decision.get("retry_after_s", 1.0)))
    headers = {
        **decision.get("headers", {}),
        "retry-after": str(retry),
        "retry-after-ms": str(int(decision.get("retry_after_s", 1.0) * 1000)),
    }
    reason = decision.get("reason", "rate_limit")
    return OpenAIError(429, what, code=f"rate_limit_exceeded:{reason}", headers=headers)


def bearer_token(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def unavailable(message: str, code: str = "model_unavailable") -> OpenAIError:
    """A 503 that tells the client when to come back."""
    retry = {"retry-after": str(UNAVAILABLE_RETRY_S), "retry-after-ms": "1000"}
    return OpenAIError(503, message, code=code, headers=retry)


def from_engine_error(exc: BaseException) -> OpenAIError | None:
    """Map a typed engine error (possibly wrapped by Ray) to its OpenAI error."""
    cause: BaseException | None = exc
    for _ in range(4):  # Ray wraps user exceptions; walk to the typed one
        if cause is None:
            break
        if isinstance(cause, ContextLengthExceededError | InvalidRequestError):
            return OpenAIError(400, cause.message, param=cause.param, code=cause.code)
        if isinstance(cause, EngineOverloadedError | EngineDeadError):
            return unavailable(str(cause) or type(cause).__name__)
        cause = getattr(cause, "cause", None) or cause.__cause__
    return None


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
        if "[" in text or text in _SCALAR_TAGS or text[:1].isupper():
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


class BodySizeLimit:
    """Pure ASGI middleware: 413 for bodies over `app.state.max_body_bytes`.

    The limit is read per request, so the ingress can set it from its config after the
    module-level app was built. Bodies without Content-Length are counted as they arrive
    and replayed to the app once known to fit.
    """

    def __init__(self, app: ASGIApp, owner: FastAPI) -> None:
        self.app, self.owner = app, owner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = getattr(self.owner.state, "max_body_bytes", None)
        if scope["type"] != "http" or limit is None:
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                await _send_error(OpenAIError(400, "invalid Content-Length header"), scope, send)
                return
            if int(length) > limit:
                await _send_error(_too_large(limit), scope, send)
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
                await _send_error(_too_large(limit), scope, send)
                return
            chunks.append(message)
            more = message.get("more_body", False)

        async def replay() -> Message:
            return chunks.pop(0) if chunks else await receive()

        await self.app(scope, replay, send)


def _too_large(limit: int) -> OpenAIError:
    return OpenAIError(413, f"request body exceeds {limit} bytes", code="request_too_large")


async def _send_error(error: OpenAIError, scope: Scope, send: Send) -> None:
    async def no_body() -> Message:
        return {"type": "http.disconnect"}

    await error.response()(scope, no_body, send)


def install_error_handlers(
    app: FastAPI, max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES
) -> None:
    """Answer every error of `app` in OpenAI's format; cap request bodies.

    Change the cap later with `app.state.max_body_bytes = n` (None turns it off).
    """
    app.state.max_body_bytes = max_body_bytes
    app.add_middleware(BodySizeLimit, owner=app)

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
        log.exception("unhandled error")
        return OpenAIError(500, "The server had an error processing your request.").response()
