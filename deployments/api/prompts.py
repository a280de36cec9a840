"""A request's prompt as the engine will see it: rendered, tokenized, and sized.

The context length (which sets the default max_tokens and what admission reserves) and
the sampling parameters are checked here, once, before admission reserves anything; the
vocabulary range of raw token ids is the engine's check.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from deployments.api.errors import OpenAIError
from deployments.api.protocol import ChatCompletionRequest, OpenAIRequest
from deployments.config.models import ModelSpec
from models.errors import InvalidRequestError, UnsupportedModelError
from models.lora import LoRARequest
from models.sampling_params import SamplingParams
from models.tokenizer import Tokenizer


@dataclass(frozen=True)
class Prompt:
    token_ids: list[int]
    params: SamplingParams
    cost: int  # what admission reserves: prompt + max_tokens for each of the n choices


@dataclass(frozen=True)
class ServedModel:
    """A model id a request may name: a base model, or a LoRA adapter on one (which
    shares its base's tokenizer, context, deployments and prices)."""

    name: str  # the id clients send and see echoed
    tokenizer: Tokenizer
    context: int  # the longest prompt + completion the engine accepts
    parent: str | None = None  # an adapter's base model
    lora: LoRARequest | None = None

    @property
    def base(self) -> str:
        """The base model: what admission, the deployments and the prices know."""
        return self.parent or self.name

    def with_adapter(self, lora: LoRARequest) -> ServedModel:
        return replace(self, name=lora.name, parent=self.name, lora=lora)

    @classmethod
    def from_files(cls, spec: ModelSpec, files: Mapping[str, bytes]) -> ServedModel:
        """From the checkpoint's tokenizer files (models.tokenizer.TOKENIZER_FILES), which
        the ingress gets from a replica or the model's `tokenizer` artifact."""
        if "config.json" not in files:
            raise UnsupportedModelError(f"model {spec.name!r}: no config.json among its "
                                        "tokenizer files")  # fmt: skip
        max_pos = json.loads(files["config.json"])["max_position_embeddings"]
        context = min(spec.engine.max_model_len or max_pos, max_pos)
        return cls(spec.name, Tokenizer.from_files(files), context)

    def prompt(self, req: OpenAIRequest, default_max_tokens: int) -> Prompt:
        chat = isinstance(req, ChatCompletionRequest)
        ids = self._token_ids(req)
        max_tokens = self._max_tokens(
            len(ids), req.requested_max_tokens(), default_max_tokens,
            "messages" if chat else "prompt",
        )
        params = _sampling(req.sampling(max_tokens, req.logprobs_k()))
        return Prompt(ids, params, len(ids) + max_tokens * req.n)

    def turn_prompt(
        self,
        messages: list[dict[str, str]],
        sampled: dict[int, list[int]],
        max_output_tokens: int | None,
        sampling: dict[str, Any],
        default_max_tokens: int,
    ) -> Prompt:
        """A Responses turn: the stored history and the new input through the chat
        template, stored replies as the ids the model sampled (a token-exact prefix)."""
        try:
            ids = self.tokenizer.encode_chat(messages, sampled=sampled)
        except InvalidRequestError as exc:
            raise OpenAIError(400, exc.message, param="input", code=exc.code) from None
        max_tokens = self._max_tokens(len(ids), max_output_tokens, default_max_tokens, "input")
        return Prompt(ids, _sampling({**sampling, "max_tokens": max_tokens}), len(ids) + max_tokens)

    def _max_tokens(
        self, prompt_len: int, requested: int | None, default_max_tokens: int, param: str
    ) -> int:
        room = self.context - prompt_len
        max_tokens = requested or min(default_max_tokens, room)
        if max_tokens > room or room <= 0:
            raise OpenAIError(
                400,
                f"This model's maximum context length is {self.context} tokens. However, you "
                f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, "
                f"{max_tokens} in the completion).",
                param=param,
                code="context_length_exceeded",
            )
        return max_tokens

    def _token_ids(self, req: OpenAIRequest) -> list[int]:
        tok = self.tokenizer
        if isinstance(req, ChatCompletionRequest):
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
            try:  # control tokens come from the template only, never from content
                return tok.encode_chat(messages)
            except InvalidRequestError as exc:
                raise OpenAIError(400, exc.message, param=exc.param, code=exc.code) from None
        prompt = req.single_prompt()
        # Token ids are checked against the vocabulary once, by the engine (a 400).
        return tok.encode(prompt) if isinstance(prompt, str) else list(prompt)


def _sampling(values: dict[str, Any]) -> SamplingParams:
    try:
        return SamplingParams(**values)
    except InvalidRequestError as exc:
        raise OpenAIError(400, exc.message, param=exc.param, code=exc.code) from None
