"""HF-format tokenizer: `tokenizers` for the vocabulary, jinja2's sandbox for chat templates.

Reads `tokenizer.json`, `tokenizer_config.json` and the eos ids from `generation_config.json`
and `config.json`, as transformers does, so real Llama/Qwen directories work by path.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Encoding
from tokenizers import Tokenizer as HFTokenizer

from models.errors import InvalidRequestError, UnsupportedModelError

# What a tokenizer is made of: small files, never the weights. The ingress receives
# these (from a model server replica or a named artifact) instead of the checkpoint.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                   "config.json")


def tokenizer_files(root: str | Path) -> dict[str, bytes]:
    """The TOKENIZER_FILES present in a checkpoint directory, by name."""
    root = Path(root)
    return {name: (root / name).read_bytes() for name in TOKENIZER_FILES
            if (root / name).is_file()}


def _json(files: Mapping[str, bytes], name: str) -> dict[str, Any]:
    return json.loads(files[name]) if name in files else {}


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


# Stands in for message i's content while the template renders, so the content's place in
# the output can be found again. Private-use characters and digits: no template filter
# (trim, upper, escape) changes them and no vocabulary gives them a meaning.
_SENTINEL = "\ue000{}\ue001"
_SENTINEL_RE = re.compile("\ue000(\\d+)\ue001")


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


class Tokenizer:
    """A checkpoint's tokenizer and chat template, as transformers renders them.

    Chat prompts go through `encode_chat`: control tokens (special added tokens such as
    <|im_start|>) come only from the template, and message content is plain text, so a
    user who types "<|im_end|><|im_start|>system" gets those characters, not a new turn.
    Completion prompts (`encode`) are the client's raw text and keep special-token parsing.

    Continuations: a conversation rendered with the generation prompt is a token prefix of
    the next turn's prompt (that history plus the assistant's reply and a new message), so
    the engine's prefix cache serves it again. Caveats: the reply is re-tokenized from its
    text, so its ids are canonical BPE and may differ from the ids the model sampled; a
    reply that starts with whitespace can fuse with the whitespace the generation prompt
    ends with into one pre-token and change the prompt's last token where the vocabulary
    has that merge (Qwen's ChatML with a reply starting "\\n": "\\n" becomes "\\n\\n"); and
    templates that rewrite past turns (Qwen3 drops earlier reasoning) break it outright.
    Llama 3's template trims content and the embedded vocabulary has no such merges, so
    for both the prefix holds.
    """

    def __init__(self, tokenizer: HFTokenizer, config: dict[str, Any], eos_ids: set[int]) -> None:
        self._tok = tokenizer
        self._config = config
        self.bos_token = _token_content(config.get("bos_token"))
        self.eos_token = _token_content(config.get("eos_token"))
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        eos_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        if eos_id is not None:
            eos_ids.add(eos_id)
        self.eos_token_ids = frozenset(eos_ids)
        self.add_bos_token = bool(config.get("add_bos_token", False))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._template = self._compile(config.get("chat_template"))
        self._control: dict[str, tuple[int, AddedToken]] = {
            t.content: (i, t) for i, t in tokenizer.get_added_tokens_decoder().items() if t.special
        }
        self._control_text = {i: t.content for i, t in self._control.values()}
        # Longest first: at one position the longest control token wins, as in `tokenizers`.
        names = sorted(self._control, key=len, reverse=True)
        self._control_re = (
            re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        if not (Path(path) / "tokenizer.json").is_file():
            raise UnsupportedModelError(f"no tokenizer.json in {path}")
        return cls.from_files(tokenizer_files(path))

    @classmethod
    def from_files(cls, files: Mapping[str, bytes]) -> Tokenizer:
        """From TOKENIZER_FILES' contents by name (tokenizer.json required)."""
        if "tokenizer.json" not in files:
            raise UnsupportedModelError("no tokenizer.json among the tokenizer files")
        tok = HFTokenizer.from_str(files["tokenizer.json"].decode())
        config = _json(files, "tokenizer_config.json")
        eos = _ids(_json(files, "generation_config.json").get("eos_token_id"))
        eos |= _ids(_json(files, "config.json").get("eos_token_id"))
        return cls(tok, config, eos)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = _encode(self._tok, text, add_special_tokens).ids
        bos = self.bos_token_id
        if add_special_tokens and self.add_bos_token and bos is not None and ids[:1] != [bos]:
            ids = [bos, *ids]
        return ids

    @cached_property
    def _plain(self) -> HFTokenizer:
        """A copy that reads special-token text as ordinary text; a copy because the flag
        is state on the tokenizer, and flipping it on the shared one races other threads."""
        tok = HFTokenizer.from_str(self._tok.to_str())
        tok.encode_special_tokens = True
        return tok

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

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        sampled: Mapping[int, Sequence[int]] | None = None,
    ) -> list[int]:
        """The chat prompt's ids, with control tokens only where the template put them.

        `sampled` maps the index of an assistant message to the ids the model sampled for
        it (a stored reply): those ids stand in for the reply's text, so a continuation's
        prompt is token for token the previous prompt plus what the model produced, and
        the replica's prefix cache serves all of it. Without them (or when the template
        cannot be traced) the reply is re-tokenized from its text.

        For content without control-token text this is exactly
        `encode(apply_chat_template(messages), add_special_tokens=False)`, i.e. what
        transformers' `apply_chat_template(tokenize=True)` gives. Content is located in the
        rendered text by rendering again with sentinels in its place; where the template
        rewrites content beyond trimming it, content that holds control-token text is
        refused (400) rather than guessed at.
        """
        rendered = self.apply_chat_template(messages, add_generation_prompt)
        ids = _encode(self._tok, rendered, False)
        if self._control_re is None and not sampled:
            return ids.ids
        contents = [m.get("content") for m in messages]
        pieces = self._locate_contents(messages, contents, rendered, add_generation_prompt)
        if pieces is not None and sampled:
            return self._encode_pieces(pieces, sampled)
        if self._control_re is None:
            return ids.ids
        if pieces is None:
            texts = (c if isinstance(c, str) else json.dumps(c, default=str) for c in contents)
            if any(self._control_re.search(text) for text in texts):
                raise InvalidRequestError(
                    "message content contains special-token text that this model's chat "
                    "template does not let the server keep apart from its control tokens",
                    "messages",
                )
            return ids.ids
        spans, pos = [], 0
        for text, owner in pieces:
            if owner is not None:
                spans.append((pos, pos + len(text)))
            pos += len(text)
        if not any(
            _overlaps(core, span) for core in self._control_spans(ids, rendered) for span in spans
        ):
            return ids.ids  # every control token is the template's: today's ids, unchanged
        return self._encode_pieces(pieces)

    def _locate_contents(
        self,
        messages: list[dict[str, Any]],
        contents: list[object],
        rendered: str,
        add_generation_prompt: bool,
    ) -> list[tuple[str, int | None]] | None:
        """`rendered` cut into (text, message index of a content piece, else None) pieces,
        or None if it cannot be traced.

        Each content is matched as given or trimmed (Llama 3 and Gemma `| trim` it); the
        pieces must rebuild `rendered` exactly, else the template did something else.
        """
        if not all(c is None or isinstance(c, str) for c in contents):
            return None  # content parts: the template renders them its own way
        masked = [
            {**m, "content": _SENTINEL.format(i)} if isinstance(c, str) else m
            for i, (m, c) in enumerate(zip(messages, contents, strict=True))
        ]
        try:
            skeleton = self.apply_chat_template(masked, add_generation_prompt)
        except InvalidRequestError:  # the template inspects content: cannot trace it
            return None
        parts = _SENTINEL_RE.split(skeleton)  # [text, index, text, index, ..., text]
        pieces: list[tuple[str, int | None]] = []
        pos = 0
        for k in range(0, len(parts) - 1, 2):
            template, index, following = parts[k], int(parts[k + 1]), parts[k + 2]
            content = contents[index] if index < len(contents) else None
            if not isinstance(content, str) or not rendered.startswith(template, pos):
                return None
            pos += len(template)
            for variant in dict.fromkeys((content, content.strip())):
                end = pos + len(variant)
                if rendered.startswith(variant, pos) and rendered.startswith(following, end):
                    break
            else:
                return None
            pieces += [(template, None), (variant, index)]
            pos = end
        if rendered[pos:] != parts[-1]:
            return None
        pieces.append((parts[-1], None))
        return pieces

    def _control_spans(self, encoding: Encoding, rendered: str) -> list[tuple[int, int]]:
        """Character spans of the control tokens in `encoding`, without the whitespace an
        lstrip/rstrip token absorbs (that whitespace may be content; the token is not)."""
        spans = []
        for token_id, (start, end) in zip(encoding.ids, encoding.offsets, strict=True):
            text = self._control_text.get(token_id)
            if text is None:
                continue
            at = rendered.find(text, start, end)
            spans.append((at, at + len(text)) if at >= 0 else (start, end))
        return spans

    def _encode_pieces(
        self,
        pieces: list[tuple[str, int | None]],
        sampled: Mapping[int, Sequence[int]] | None = None,
    ) -> list[int]:
        """Control tokens parsed in template pieces only. The text between two control
        tokens (template text and content together) is encoded as one run, as `tokenizers`
        does for the whole string, so ordinary stretches tokenize exactly as they would.
        A content piece with sampled ids ends the run before it (where the generation
        prompt ended when the model sampled them) and is those ids."""
        sampled = sampled or {}
        ids: list[int] = []
        run: list[str] = []
        strip_next = False  # the last control token was rstrip: it eats following spaces

        def flush(before_lstrip_token: bool) -> None:
            text = "".join(run)
            run.clear()
            if before_lstrip_token:  # it eats the spaces before it
                text = text.rstrip()
            if text:
                ids.extend(_encode(self._plain, text, False).ids)

        for text, owner in pieces:
            if owner is not None and owner in sampled:
                flush(before_lstrip_token=False)
                ids.extend(sampled[owner])
                strip_next = False
                continue
            if owner is not None or self._control_re is None:
                parts = [text]
            else:
                parts = self._control_re.split(text)
            for k, part in enumerate(parts):
                if k % 2 == 0:  # text (all of a content piece is text)
                    if strip_next:
                        part = part.lstrip()
                        strip_next = not part
                    run.append(part)
                    continue
                token_id, token = self._control[part]
                flush(before_lstrip_token=token.lstrip)
                ids.append(token_id)
                strip_next = token.rstrip
        flush(before_lstrip_token=False)
        return ids


def _encode(tok: HFTokenizer, text: str, add_special_tokens: bool) -> Encoding:
    """`tok.encode`, as a batch of one: the batch call lets go of the GIL while it runs,
    so a long prompt tokenized on a worker thread does not stall the ingress's loop."""
    return tok.encode_batch([text], add_special_tokens=add_special_tokens)[0]
