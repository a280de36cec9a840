"""HF-format tokenizer: `tokenizers` for the vocabulary, jinja2's sandbox for chat templates.

Reads `tokenizer.json`, `tokenizer_config.json` and the eos ids of `generation_config.json`
and `config.json` the way transformers does, so real Llama-3 / Qwen2 directories work by
path and the embedded default model is just one more such directory.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from models.errors import InvalidRequestError, UnsupportedModelError

# Special-token variables HF hands to every chat template.
_TEMPLATE_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_content(value: object) -> str | None:
    """tokenizer_config stores special tokens as plain strings or AddedToken dicts."""
    if isinstance(value, Mapping):
        content = value.get("content")
        return content if isinstance(content, str) else None
    return value if isinstance(value, str) else None


def _int_ids(value: object) -> set[int]:
    """`eos_token_id` is an int or a list of ints (Llama 3 instruct lists three)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return {value}
    if isinstance(value, list):
        return {v for v in value if isinstance(v, int) and not isinstance(v, bool)}
    return set()


def _pick_template(value: object) -> str | None:
    """`chat_template` is a string or a list of {name, template}; the "default" one wins."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        value = named.get("default")
    return value if isinstance(value, str) else None


def _plain(value: Any) -> Any:
    """Copy request data into plain JSON types, so the template sees no live objects."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if callable(getattr(value, "model_dump", None)):  # pydantic models
        return _plain(value.model_dump())
    return str(value)


class _TemplateRaised(Exception):
    """What `raise_exception(...)` inside a template raises; its message goes to the caller."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """HF's `tojson`: jinja's own escapes HTML characters, which templates do not expect."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    """The same sandbox settings as transformers, so templates render identically."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class Tokenizer:
    """Encode, decode and chat-format text for one checkpoint directory."""

    def __init__(
        self, backend: HFTokenizer, config: Mapping[str, Any], eos_ids: set[int] | None = None
    ) -> None:
        self._tok = backend
        self.special_tokens = {k: _token_content(config.get(k)) for k in _TEMPLATE_TOKENS}
        self.bos_token = self.special_tokens["bos_token"]
        self.eos_token = self.special_tokens["eos_token"]
        self.bos_token_id: int | None = (
            backend.token_to_id(self.bos_token) if self.bos_token else None
        )
        eos = set(eos_ids or ())
        if self.eos_token and (eos_id := backend.token_to_id(self.eos_token)) is not None:
            eos.add(eos_id)
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.add_bos_token = bool(config.get("add_bos_token", False))
        # Llama 3's post-processor already prepends BOS; never add a second one.
        probe = backend.encode("a", add_special_tokens=True).ids
        self._post_processor_adds_bos = self.bos_token_id is not None and (
            probe[:1] == [self.bos_token_id]
        )
        self._template: jinja2.Template | None = None
        self._template_error: str | None = None
        source = _pick_template(config.get("chat_template"))
        if source is not None:
            try:
                self._template = _environment().from_string(source)
            except jinja2.TemplateError as exc:  # reported per request, not at load
                self._template_error = f"the model's chat template does not compile: {exc}"

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        root = Path(path)
        if not (root / "tokenizer.json").is_file():
            raise UnsupportedModelError(f"no tokenizer.json in {root}")
        backend = HFTokenizer.from_file(str(root / "tokenizer.json"))
        config = _read_json(root / "tokenizer_config.json")
        # Older checkpoints keep the template in its own file; tokenizer_config wins if both.
        if "chat_template" not in config:
            jinja_file = root / "chat_template.jinja"
            if jinja_file.is_file():
                config["chat_template"] = jinja_file.read_text(encoding="utf-8")
            elif (root / "chat_template.json").is_file():
                config["chat_template"] = _read_json(root / "chat_template.json").get(
                    "chat_template"
                )
        eos = _int_ids(_read_json(root / "generation_config.json").get("eos_token_id"))
        eos |= _int_ids(_read_json(root / "config.json").get("eos_token_id"))
        return cls(backend, config, eos)

    @property
    def backend(self) -> HFTokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._tok

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; BOS is added once, by the post-processor or by `add_bos_token`."""
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if (
            add_special_tokens
            and self.add_bos_token
            and self.bos_token_id is not None
            and not self._post_processor_adds_bos
        ):
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """Text of one token as OpenAI's logprobs show it (may be a partial character)."""
        return self._tok.decode([token_id], skip_special_tokens=False)

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """Render the conversation; any template failure is the request's fault (HTTP 400)."""
        if self._template is None:
            raise InvalidRequestError(
                self._template_error or "this model has no chat template; use /v1/completions",
                param="messages",
            )
        variables = {k: v or "" for k, v in self.special_tokens.items()}
        try:
            return self._template.render(
                messages=_plain(messages),
                add_generation_prompt=add_generation_prompt,
                tools=None,
                documents=None,
                **variables,
            )
        except _TemplateRaised as exc:
            raise InvalidRequestError(str(exc), param="messages") from exc
        except Exception as exc:  # template code is data: whatever it raises is a bad request
            raise InvalidRequestError(
                f"could not apply the chat template to these messages: {exc}", param="messages"
            ) from exc
