"""Typed engine errors. The API layer maps each to an HTTP status and OpenAI's error JSON."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of everything the engine raises on purpose."""


class InvalidRequestError(EngineError, ValueError):
    """The caller sent something the engine cannot serve (HTTP 400)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or "invalid_value"


class ContextLengthExceededError(InvalidRequestError):
    """Prompt (plus max_tokens) does not fit the model's context window (HTTP 400)."""

    def __init__(self, message: str, param: str | None = "messages") -> None:
        super().__init__(message, param=param, code="context_length_exceeded")


class LoRALoadError(InvalidRequestError):
    """A LoRA adapter cannot be used (bad path, config, weights or LoRA disabled; HTTP 400).

    `param` names the offending field, e.g. "lora_path", "r", "use_dora", "target_modules".
    """

    def __init__(self, message: str, param: str | None = "lora_path") -> None:
        # One line even when it quotes a library's multi-line error.
        super().__init__(" ".join(message.split()), param=param, code="lora_load_failed")


class UnsupportedModelError(EngineError, ValueError):
    """A checkpoint's config names an architecture or option the engine does not implement."""


class EngineDeadError(EngineError):
    """The engine loop or a TP rank died; in-flight requests end with this (HTTP 503)."""


class EngineOverloadedError(EngineError):
    """The engine refuses new work for now, e.g. while draining for shutdown (HTTP 503)."""
