"""OpenAI's error format for every failure: {"error": {message, type, param, code}}.

Every path a client can trigger maps to a 4xx here; only a bug reaches the 500 handler.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.errors import (
    ContextLengthExceededError,
    EngineDeadError,
    EngineOverloadedError,
    InvalidRequestError,
)

log = logging.getLogger(__name__)

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


class OpenAIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def response(self, extra_headers: dict[str, str] | None = None) -> JSONResponse:
        body = {
            "error": {
                "message": self.message,
                "type": _TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }
        return JSONResponse(body, self.status, headers={**self.headers, **(extra_headers or {})})


def from_engine_error(exc: BaseException) -> OpenAIError | None:
    """Map a typed engine error (possibly wrapped by Ray) to its OpenAI error."""
    cause = exc
    for _ in range(4):  # Ray wraps user exceptions; walk to the typed one
        if isinstance(cause, ContextLengthExceededError):
            return OpenAIError(400, cause.message, param=cause.param, code=cause.code)
        if isinstance(cause, InvalidRequestError):
            return OpenAIError(400, cause.message, param=cause.param, code=cause.code)
        if isinstance(cause, EngineOverloadedError | EngineDeadError):
            return OpenAIError(503, str(cause), code="model_unavailable")
        nested = getattr(cause, "cause", None) or cause.__cause__
        if nested is None:
            break
        cause = nested
    return None


def _validation_param(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return "We could not parse the JSON body of your request.", None
    if kind == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param
    return f"Invalid value for '{param}': {first.get('msg', 'invalid')}", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai(_: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_param(exc)
        return OpenAIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        messages = {404: "Unknown endpoint.", 405: "Method not allowed."}
        message = messages.get(exc.status_code, str(exc.detail))
        return OpenAIError(exc.status_code, message).response()

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
