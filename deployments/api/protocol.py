"""OpenAI request and response schemas.

Requests are strict like OpenAI's: unknown fields are 400, "8" is not a number. Known
OpenAI features that Tiered does not implement (tools, JSON schemas, images, audio) are
accepted by the schema only so that they can be refused by name, never silently ignored.
The response models document what the ingress sends and give the OpenAPI document its
shapes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from deployments.api.errors import OpenAIError, from_validation_error

INT64 = 2**63
# Known OpenAI parameters Tiered does not implement -> values that mean "not used".
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None, False),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
    "store": (None, False),
    "metadata": (None, {}),
    "suffix": (None, ""),
    "best_of": (None, 1),
    "echo": (None, False),
}
# Message fields of tool calling and audio: refused by name when set.
UNSUPPORTED_MESSAGE_FIELDS = ("tool_calls", "tool_call_id", "function_call", "audio")
UNSUPPORTED_PART_TYPES = frozenset({"image_url", "input_audio", "file", "refusal"})
# Fields whose explicit JSON null means "the default", as OpenAI accepts.
_NULL_MEANS_DEFAULT = frozenset(
    {"n", "stream", "presence_penalty", "frequency_penalty", "logprobs"}
)


def _refuse(name: str, what: str, code: str = "unsupported_parameter") -> OpenAIError:
    return OpenAIError(400, f"{what} is not supported by this server", param=name, code=code)


class _Strict(BaseModel):
    # strict: "8" is not a number, as OpenAI answers; extra: unknown fields are 400.
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class UnsupportedPart(BaseModel):
    """An image, audio, file or refusal part: parsed only to be refused by name."""

    model_config = ConfigDict(extra="allow")

    type: str


def _part_kind(part: Any) -> str:
    """Route a content part by its type, so errors come from the arm it meant."""
    kind = part.get("type") if isinstance(part, dict) else getattr(part, "type", None)
    return "UnsupportedPart" if kind in UNSUPPORTED_PART_TYPES else "TextPart"


ContentPart = Annotated[
    Annotated[TextPart, Tag("TextPart")] | Annotated[UnsupportedPart, Tag("UnsupportedPart")],
    Discriminator(_part_kind),
]


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | Annotated[list[ContentPart], Field(min_length=1)] | None = Field(
        None, validate_default=True
    )
    name: str | None = None
    refusal: str | None = None
    tool_calls: Any = None
    tool_call_id: Any = None
    function_call: Any = None
    audio: Any = None

    @field_validator("content")
    @classmethod
    def _content_required(cls, content: Any, info: ValidationInfo) -> Any:
        # An assistant turn may omit content (it had tool calls, refused later by name).
        role = info.data.get("role")
        if content is None and role not in ("assistant", "tool", None):
            raise ValueError(f"a '{role}' message needs 'content'")
        return content

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if isinstance(part, TextPart))

    def refuse_unsupported(self, index: int) -> None:
        where = f"messages.{index}"
        if self.role in ("tool", "function"):
            raise _refuse(f"{where}.role", f"role '{self.role}'", "unsupported_value")
        for name in UNSUPPORTED_MESSAGE_FIELDS:
            if getattr(self, name) is not None:
                raise _refuse(f"{where}.{name}", f"'{name}' in messages")
        if isinstance(self.content, list):
            for j, part in enumerate(self.content):
                if isinstance(part, UnsupportedPart):
                    what = f"content part type '{part.type}'"
                    raise _refuse(f"{where}.content.{j}.type", what, "unsupported_value")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    model: str = Field(min_length=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    service_tier: Literal["auto", "default"] | None = None
    # vLLM's extra sampling parameter: generate exactly max_tokens (benchmarks rely on it).
    ignore_eos: bool = False
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

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in _NULL_MEANS_DEFAULT}
        return data

    def refuse_unsupported(self) -> None:
        """400 naming the first known-but-unsupported feature the request uses."""
        for name, unset in UNSUPPORTED.items():
            if name in type(self).model_fields and getattr(self, name) not in unset:
                raise _refuse(name, f"'{name}'")
        if self.logit_bias:
            raise _refuse("logit_bias", "'logit_bias'")
        if self.response_format is not None and self.response_format != {"type": "text"}:
            kind = self.response_format.get("type")
            raise _refuse("response_format", f"response_format type {kind!r}", "unsupported_value")
        if self.stream_options is not None and not self.stream:
            raise OpenAIError(
                400,
                "'stream_options' is only allowed when 'stream' is true",
                param="stream_options",
            )
        for i, message in enumerate(getattr(self, "messages", ())):
            message.refuse_unsupported(i)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

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
            "ignore_eos": self.ignore_eos,
        }


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        self.logprobs_k()  # top_logprobs without logprobs

    def requested_max_tokens(self) -> int | None:
        """max_completion_tokens wins: max_tokens is OpenAI's deprecated spelling."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

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
            prompt = prompt[0]
        if isinstance(prompt, str) and not prompt:
            raise OpenAIError(400, "'prompt' must not be empty", param="prompt")
        return prompt  # type: ignore[return-value]


OpenAIRequest = ChatCompletionRequest | CompletionRequest


def parse_request(kind: Literal["chat", "completion"], body: Any) -> OpenAIRequest:
    """A JSON body -> a validated request, or OpenAIError 400 naming the parameter."""
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    schema = ChatCompletionRequest if kind == "chat" else CompletionRequest
    try:
        request = schema.model_validate(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None
    request.refuse_unsupported()
    return request


def sampling_kwargs(request: OpenAIRequest, max_tokens: int) -> dict[str, Any]:
    """Keyword arguments for SamplingParams; `max_tokens` is what the ingress resolved
    (requested_max_tokens() or its default, capped by the context window)."""
    return request.sampling(max_tokens, request.logprobs_k())


# ---- responses ----------------------------------------------------------------------
ServiceTierUsed = Literal["dedicated", "shared"]
FinishReason = Literal["stop", "length"]


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason


class _Response(BaseModel):
    id: str
    created: int
    model: str
    service_tier: ServiceTierUsed
    system_fingerprint: str | None = None


class ChatCompletion(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: CompletionUsage


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(_Response):
    """One SSE event; with include_usage every chunk has usage null but the last."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChunkChoice]
    usage: CompletionUsage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None  # None only in stream chunks before the end


class Completion(_Response):
    """The body of /v1/completions and, streamed, each of its SSE events."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "tiered"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
