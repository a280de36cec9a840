"""OpenAI request schemas: strict like OpenAI's (unknown fields are 400), plus the
known-but-unsupported features, refused by name rather than silently ignored."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from deployments.api_errors import OpenAIError

# Known OpenAI parameters Tiered does not implement: 400 naming the parameter if set.
UNSUPPORTED = (
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "parallel_tool_calls",
    "audio",
    "modalities",
    "prediction",
    "reasoning_effort",
    "web_search_options",
    "suffix",
    "best_of",
    "echo",
    "store",
    "metadata",
)


class _Strict(BaseModel):
    # strict: "8" is not a number, as OpenAI answers; extra: unknown fields are 400.
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    model: str = Field(min_length=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    service_tier: Literal["auto", "default"] | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    # Accepted so that they can be refused by name (see UNSUPPORTED).
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    store: Any = None
    metadata: Any = None

    def refuse_unsupported(self) -> None:
        for name in UNSUPPORTED:
            if getattr(self, name, None) not in (None, False, [], {}):
                raise OpenAIError(
                    400,
                    f"'{name}' is not supported by this server",
                    param=name,
                    code="unsupported_parameter",
                )
        if self.logit_bias:
            raise OpenAIError(
                400,
                "'logit_bias' is not supported",
                param="logit_bias",
                code="unsupported_parameter",
            )
        if self.response_format and self.response_format.get("type") != "text":
            raise OpenAIError(
                400,
                "only response_format {'type': 'text'} is supported",
                param="response_format",
                code="unsupported_parameter",
            )
        if self.stream_options is not None and not self.stream:
            raise OpenAIError(
                400,
                "'stream_options' is only allowed when 'stream' is true",
                param="stream_options",
            )

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        if len(stops) > 4:
            raise OpenAIError(400, "'stop' takes at most 4 sequences", param="stop")
        return stops

    def sampling(self, max_tokens: int, logprobs: int | None) -> dict[str, Any]:
        """Keyword arguments for models.sampling_params.SamplingParams."""
        return {
            "max_tokens": max_tokens,
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "n": self.n,
            "stop": self.stop_list(),
            "seed": self.seed,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "logprobs": logprobs,
        }


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprobs_k(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise OpenAIError(
                400, "'top_logprobs' requires 'logprobs' to be true", param="top_logprobs"
            )
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] = Field(min_length=1)
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    suffix: Any = None
    best_of: Any = None
    echo: Any = None

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def logprobs_k(self) -> int | None:
        return self.logprobs

    def single_prompt(self) -> str | list[int]:
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise OpenAIError(
                    400,
                    "batched prompts are not supported; send one prompt",
                    param="prompt",
                    code="unsupported_parameter",
                )
            return prompt[0]
        if isinstance(prompt, str) and not prompt:
            raise OpenAIError(400, "'prompt' must not be empty", param="prompt")
        return prompt  # type: ignore[return-value]
