"""HF-format tokenizer: `tokenizers` for the vocabulary, jinja2's sandbox for chat templates.

Reads `tokenizer.json`, `tokenizer_config.json` and the eos ids from `generation_config.json`
and `config.json`, as transformers does, so real Llama/Qwen directories work by path.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from models.errors import InvalidRequestError, UnsupportedModelError


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_content(value: object) -> str | None:
    """tokenizer_config stores special tokens as strings or AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: object) -> set[int]:
    if isinstance(value, int):
        return {value}
    if isinstance(value, list):
        return {v for v in value if isinstance(v, int)}
    return set()


class _TemplateError(Exception):
    pass


def _raise_exception(message: str) -> None:
    raise _TemplateError(message)


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, config: dict[str, Any], eos_ids: set[int]) -> None:
        self._tok = tokenizer
        self._config = config
        self.bos_token = _token_content(config.get("bos_token"))
        self.eos_token = _token_content(config.get("eos_token"))
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        if self.eos_token and self._tok.token_to_id(self.eos_token) is not None:
            eos_ids.add(self._tok.token_to_id(self.eos_token))
        self.eos_token_ids = frozenset(eos_ids)
        self.add_bos_token = bool(config.get("add_bos_token", False))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._template = self._compile(config.get("chat_template"))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        root = Path(path)
        if not (root / "tokenizer.json").is_file():
            raise UnsupportedModelError(f"no tokenizer.json in {root}")
        tok = HFTokenizer.from_file(str(root / "tokenizer.json"))
        config = _read_json(root / "tokenizer_config.json")
        eos = _ids(_read_json(root / "generation_config.json").get("eos_token_id"))
        eos |= _ids(_read_json(root / "config.json").get("eos_token_id"))
        return cls(tok, config, eos)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        bos = self.bos_token_id
        if add_special_tokens and self.add_bos_token and bos is not None and ids[:1] != [bos]:
            ids = [bos, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """Text of one token as OpenAI's logprobs show it (may be a partial character)."""
        return self._tok.decode([token_id], skip_special_tokens=False)

    # ---- chat template --------------------------------------------------------------
    @staticmethod
    def _compile(template: object) -> jinja2.Template | None:
        if isinstance(template, list):  # [{"name": "default", "template": "..."}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if not isinstance(template, str):
            return None
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = lambda v, indent=None: json.dumps(
            v, ensure_ascii=False, indent=indent
        )
        return env.from_string(template)

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        if self._template is None:
            raise InvalidRequestError(
                "this model has no chat template; use /v1/completions", "messages"
            )
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except (_TemplateError, jinja2.TemplateError, TypeError, KeyError) as exc:
            raise InvalidRequestError(f"invalid messages: {exc}", "messages") from exc
