"""Requests of OpenAI's Responses and Conversations APIs, parsed as strictly as chat's.

Like deployments.api.protocol: pydantic strict (a "8" is not a number), unknown fields are
400 naming the field, and OpenAI's features that Tiered does not implement (tools,
reasoning, structured output, images, background runs) are in the schema only so that
they are refused by name when set, never silently ignored. Params name positions the
way OpenAI's Responses errors do: "input[2].content[0]".
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    model_validator,
)

from deployments.api.conversation_objects import ListParams as ListParams
from deployments.api.conversation_objects import parse_list_params as parse_list_params
from deployments.api.errors import OpenAIError, from_validation_error
from deployments.api.response_objects import message_item as message_item

if TYPE_CHECKING:
    from deployments.state.stored import StoredItem

MAX_ITEMS_PER_CALL = 20  # OpenAI's cap on items in one conversation create / items call
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512
# Input item types OpenAI knows besides messages (openai.types.responses.ResponseInputItem).
NON_MESSAGE_ITEM_TYPES = frozenset(
    {
        "file_search_call", "computer_call", "computer_call_output", "web_search_call",
        "function_call", "function_call_output", "tool_search_call", "tool_search_output",
        "additional_tools", "configuration_update", "reasoning", "compaction",
        "compaction_trigger", "image_generation_call", "code_interpreter_call",
        "local_shell_call", "local_shell_call_output", "shell_call", "shell_call_output",
        "apply_patch_call", "apply_patch_call_output", "mcp_list_tools",
        "mcp_approval_request", "mcp_approval_response", "mcp_call", "custom_tool_call",
        "custom_tool_call_output", "item_reference", "program", "program_output",
    }
)  # fmt: skip
MULTIMODAL_PART_TYPES = frozenset({"input_image", "input_file", "input_audio"})
# Known create parameters Tiered does not implement -> the values that mean "not used".
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "tools": (None, []), "tool_choice": (None, "none", "auto"), "include": (None, []),
    "background": (None, False), "prompt": (None,), "top_logprobs": (None, 0),
    "max_tool_calls": (None,), "prompt_cache_key": (None,), "prompt_cache_retention": (None,),
    "prompt_cache_options": (None,), "safety_identifier": (None,),
    "context_management": (None, []), "moderation": (None,), "access_programs": (None,),
    "background_options": (None,), "image": (None,),
}  # fmt: skip
# Fields whose null is passed on: required ones (null is then a type error) and metadata,
# whose null OpenAI takes as "no metadata" even where it is required.
_KEEP_NULL = frozenset({"model", "input", "items", "metadata"})


def _refuse(param: str, what: str, verb: str = "is") -> OpenAIError:
    message = f"{what} {verb} not supported by this server"
    return OpenAIError(400, message, param=param, code="unsupported_parameter")


def _bad(param: str, what: str, code: str | None = "invalid_value") -> OpenAIError:
    return OpenAIError(400, f"Invalid value for '{param}': {what}", param=param, code=code)


def _unset(value: Any, unset: tuple[Any, ...]) -> bool:
    # By type too: 0 == False in Python, but `background: 0` is not `false`.
    return any(value == u and type(value) is type(u) for u in unset)


def _bracketed(param: str) -> str:
    """ "input.2.content.0.text" -> "input[2].content[0].text", as OpenAI names them."""
    return re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", param)


def _validation_error(exc: ValidationError, prefix: str = "") -> OpenAIError:
    """from_validation_error's choice of error, with its param in OpenAI's Responses
    spelling and placed under `prefix` (the item it came from)."""
    error = from_validation_error(exc)
    if error.param is None:
        return error
    param = _bracketed(error.param)
    if prefix:
        param = prefix + ("" if param.startswith("[") else ".") + param
    message = error.message.replace(f"'{error.param}'", f"'{param}'")
    if message.endswith(f": {error.param}"):  # "Unrecognized request argument supplied: x"
        message = message.removesuffix(error.param) + param
    return OpenAIError(error.status, message, param=param, code=error.code)


def _check_metadata(value: Any) -> Any:
    """OpenAI's limits: 16 pairs, keys up to 64 characters, string values up to 512."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError("expected an object of string keys and values")
    if len(value) > MAX_METADATA_PAIRS:
        raise ValueError(f"at most {MAX_METADATA_PAIRS} pairs, got {len(value)}")
    for key, item in value.items():
        if len(key) > MAX_METADATA_KEY:
            raise ValueError(f"keys are at most {MAX_METADATA_KEY} characters, got {len(key)}")
        if not isinstance(item, str):
            raise ValueError(f"the value of {key!r} must be a string")
        if len(item) > MAX_METADATA_VALUE:
            raise ValueError(
                f"values are at most {MAX_METADATA_VALUE} characters; {key!r} has {len(item)}"
            )
    return value


Metadata = Annotated[dict[str, str] | None, BeforeValidator(_check_metadata)]
NonEmpty = Annotated[str, Field(min_length=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        # OpenAI's optional parameters take an explicit null as "not set".
        if isinstance(data, dict):
            fields = cls.model_fields
            return {
                k: v for k, v in data.items() if v is not None or k not in fields or k in _KEEP_NULL
            }
        return data


# ---- input items ----------------------------------------------------------------------
@dataclass(frozen=True)
class InputMessage:
    """One message of the input, as text; "developer" stays (the renderer maps it)."""

    role: str
    text: str


class _InputText(_Strict):
    type: Literal["input_text"]
    text: str
    prompt_cache_breakpoint: Any = None


class _OutputText(_Strict):
    # An assistant turn replayed from an earlier response's output: its annotations and
    # logprobs describe the text and are not instructions, so they are accepted.
    type: Literal["output_text"]
    text: str
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class _Message(_Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[Any]
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    phase: Literal["commentary", "final_answer"] | None = None


def _part_text(part: Any, role: str, where: str) -> str:
    if not isinstance(part, dict):
        raise OpenAIError(400, f"Invalid type for '{where}': expected an object.", param=where)
    kind = part.get("type")
    if kind in MULTIMODAL_PART_TYPES:
        raise _refuse(where, f"multimodal input ('{kind}' parts)")
    if kind == "refusal" and role == "assistant":
        raise _refuse(where, "'refusal' parts", "are")
    allowed = "output_text" if role == "assistant" else "input_text"
    if kind != allowed:
        raise _bad(f"{where}.type", f"{kind!r}; {role} messages take '{allowed}' parts.")
    schema = _OutputText if role == "assistant" else _InputText
    try:
        parsed = schema.model_validate(part)
    except ValidationError as exc:
        raise _validation_error(exc, where) from None
    if isinstance(parsed, _InputText) and parsed.prompt_cache_breakpoint is not None:
        raise _refuse(f"{where}.prompt_cache_breakpoint", "'prompt_cache_breakpoint'")
    return parsed.text


def _input_message(item: Any, where: str) -> InputMessage:
    """One input item as a message, or a 400 that names where in the input it is."""
    if not isinstance(item, dict):
        raise OpenAIError(400, f"Invalid type for '{where}': expected an object.", param=where)
    kind = item.get("type")
    if kind is None and "role" not in item and "id" in item:
        kind = "item_reference"  # OpenAI's {"id": ...} without a type references an item
    if isinstance(kind, str) and kind in NON_MESSAGE_ITEM_TYPES:
        raise _refuse(where, f"input items of type '{kind}'", "are")
    if kind not in (None, "message"):
        raise _bad(f"{where}.type", f"{kind!r} is not an input item type.")
    try:
        message = _Message.model_validate(item)
    except ValidationError as exc:
        raise _validation_error(exc, where) from None
    if isinstance(message.content, str):
        return InputMessage(message.role, message.content)
    if not message.content:
        raise _bad(f"{where}.content", "empty.", code=None)
    text = "".join(
        _part_text(part, message.role, f"{where}.content[{j}]")
        for j, part in enumerate(message.content)
    )
    return InputMessage(message.role, text)


def _input_messages(items: list[Any], param: str) -> list[InputMessage]:
    return [_input_message(item, f"{param}[{i}]") for i, item in enumerate(items)]


def _stored(messages: list[InputMessage]) -> list[StoredItem]:
    from deployments.state.stored import StoredItem  # lazily: parsing needs no SQLAlchemy

    items = []
    for m in messages:
        item_id = "msg_" + uuid.uuid4().hex
        body = message_item(item_id, m.role, m.text, output=m.role == "assistant")
        items.append(StoredItem(item_id, body))
    return items


# ---- POST /v1/responses -----------------------------------------------------------------
class ConversationRef(_Strict):
    id: NonEmpty


class _StreamOptions(_Strict):
    include_obfuscation: bool = True  # Tiered never pads deltas; either value is honoured


class _TextConfig(_Strict):
    format: dict[str, Any] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ResponsesRequest(_Strict):
    """A validated create-response body; `messages()` is its input as text messages."""

    model: NonEmpty
    input: str | list[Any]
    instructions: str | None = None
    previous_response_id: NonEmpty | None = None
    conversation: str | ConversationRef | None = None  # a tag-free union: clean params
    store: bool = True
    stream: bool = False
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)  # the engine refuses 0
    service_tier: Literal["auto", "default"] | None = None
    metadata: Metadata = None
    user: str | None = Field(None, max_length=256)
    parallel_tool_calls: bool = True  # no tools, so either value means the same
    truncation: Literal["auto", "disabled"] = "disabled"
    text: _TextConfig | None = None
    reasoning: dict[str, Any] | None = None
    stream_options: _StreamOptions | None = None
    # Accepted so that they can be refused by name (see UNSUPPORTED).
    tools: Any = None
    tool_choice: Any = None
    include: Any = None
    background: Any = None
    prompt: Any = None
    top_logprobs: Any = None
    max_tool_calls: Any = None
    prompt_cache_key: Any = None
    prompt_cache_retention: Any = None
    prompt_cache_options: Any = None
    safety_identifier: Any = None
    context_management: Any = None
    moderation: Any = None
    access_programs: Any = None
    background_options: Any = None
    image: Any = None

    _messages: list[InputMessage] = PrivateAttr(default_factory=list)

    @property
    def conversation_id(self) -> str | None:
        if isinstance(self.conversation, ConversationRef):
            return self.conversation.id
        return self.conversation

    def messages(self) -> list[InputMessage]:
        """This turn's new input; a string input is one user message."""
        return list(self._messages)

    def sampling(self) -> dict[str, Any]:
        """SamplingParams keyword arguments, less max_tokens (the ingress resolves it)."""
        return {
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
        }

    def check(self) -> None:
        """400 for the first unsupported feature or contradiction; then parse the input."""
        for name, unset in UNSUPPORTED.items():
            if not _unset(getattr(self, name), unset):
                raise _refuse(name, f"'{name}'")
        if self.reasoning and any(
            v is not None and (k, v) != ("effort", "none") for k, v in self.reasoning.items()
        ):
            raise _refuse("reasoning", "'reasoning'")
        if self.truncation == "auto":
            raise _refuse("truncation", "'truncation': 'auto'")
        self._check_text()
        if self.stream_options is not None and not self.stream:
            raise OpenAIError(
                400, "'stream_options' is only allowed when 'stream' is true",
                param="stream_options",
            )  # fmt: skip
        if self.conversation == "":
            raise _bad("conversation", "empty.", code=None)
        if self.previous_response_id is not None and self.conversation is not None:
            raise OpenAIError(
                400, "'previous_response_id' and 'conversation' cannot be used together; "
                "a response continues either a previous response or a conversation.",
                param="previous_response_id",
            )  # fmt: skip
        if not self.input:
            raise _bad("input", "empty.", code=None)
        if isinstance(self.input, str):
            self._messages = [InputMessage("user", self.input)]
        else:
            self._messages = _input_messages(self.input, "input")

    def _check_text(self) -> None:
        if self.text is None:
            return
        fmt = self.text.format
        if fmt is not None and fmt != {"type": "text"}:
            kind = fmt.get("type")
            if kind in ("json_schema", "json_object"):
                raise _refuse("text.format", f"'text.format' of type {kind!r}")
            raise _bad("text.format", f"type {kind!r}; expected 'text'.")
        if self.text.verbosity not in (None, "medium"):
            raise _refuse("text.verbosity", f"'text.verbosity': {self.text.verbosity!r}")


M = TypeVar("M", bound=BaseModel)


def _validate(schema: type[M], body: Any) -> M:
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    try:
        return schema.model_validate(body)
    except ValidationError as exc:
        raise _validation_error(exc) from None


def parse_responses_request(body: Any) -> ResponsesRequest:
    """A JSON body -> a validated request, or OpenAIError 400 naming the parameter."""
    request = _validate(ResponsesRequest, body)
    request.check()
    return request


# ---- the Conversations API --------------------------------------------------------------
class _ConversationCreate(_Strict):
    items: list[Any] | None = Field(None, max_length=MAX_ITEMS_PER_CALL)
    metadata: Metadata = None


class _ConversationUpdate(_Strict):
    metadata: Metadata  # required by OpenAI; null clears it


class _ItemsCreate(_Strict):
    items: list[Any] = Field(min_length=1, max_length=MAX_ITEMS_PER_CALL)
    include: Any = None


@dataclass(frozen=True)
class ConversationItems:
    """Messages to add to a conversation (at its creation, or later) and, at creation,
    its metadata; for an update, only the metadata."""

    messages: list[InputMessage]
    metadata: dict[str, str]

    def stored_items(self) -> list[StoredItem]:
        """The messages with fresh ids, as the store keeps them."""
        return _stored(self.messages)


def parse_conversation_create(body: Any) -> ConversationItems:
    """POST /v1/conversations: up to 20 initial items (the input's rules) and metadata."""
    req = _validate(_ConversationCreate, body)
    return ConversationItems(_input_messages(req.items or [], "items"), dict(req.metadata or {}))


def parse_conversation_update(body: Any) -> ConversationItems:
    """POST /v1/conversations/{id}: the new metadata (required; null clears it)."""
    return ConversationItems([], dict(_validate(_ConversationUpdate, body).metadata or {}))


def parse_items_create(body: Any) -> ConversationItems:
    """POST /v1/conversations/{id}/items: 1 to 20 items; `include` is refused by name."""
    req = _validate(_ItemsCreate, body)
    if not _unset(req.include, (None, [])):
        raise _refuse("include", "'include'")
    return ConversationItems(_input_messages(req.items, "items"), {})
