"""Synthetic prompt text of a given token length, different for every request.

Each prompt is a seeded random sequence of English words, so two prompts share no prefix
beyond the chat template (a prefix cache gets no accidental hits). With a tokenizer
(`tokenizer:` in the scenario, or the served model's for a local target), the text is cut
to the exact token count; without one, the length is estimated from a words-per-token
ratio. The server's `usage.prompt_tokens` is what the report counts either way.
"""

from __future__ import annotations

import random
import re
from functools import cache
from pathlib import Path

CORPUS = Path(__file__).resolve().parent.parent / "models" / "data" / "corpus.txt"
WORDS_PER_TOKEN = 0.75  # the usual estimate for English BPE vocabularies
FALLBACK_WORDS = ("the", "a", "of", "to", "and", "in", "is", "it", "that", "was", "for", "on")


@cache
def vocabulary() -> tuple[str, ...]:
    if not CORPUS.is_file():
        return tuple(FALLBACK_WORDS)
    words = sorted({w.lower() for w in re.findall(r"[A-Za-z]+", CORPUS.read_text())})
    return tuple(words) or tuple(FALLBACK_WORDS)


def load_tokenizer(spec: str | None):  # type: ignore[no-untyped-def]
    """A `tokenizers.Tokenizer` from a checkpoint dir (or `default:tiny`), or None."""
    if not spec:
        return None
    from tokenizers import Tokenizer

    if spec.startswith("default:"):
        from models.default_model import resolve_model_path

        path = resolve_model_path(spec)
    else:
        path = Path(spec).expanduser()
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"tokenizer {spec!r}: no tokenizer.json at {file}")
    return Tokenizer.from_file(str(file))


class PromptFactory:
    """Prompts of n tokens from a seeded RNG (one factory per tenant, so adding a tenant
    does not change another tenant's prompts)."""

    def __init__(self, seed: int | str, tokenizer=None) -> None:  # type: ignore[no-untyped-def]
        self.rng = random.Random(seed)
        self.tokenizer = tokenizer
        self.words = vocabulary()

    def _words(self, n: int) -> str:
        return " ".join(self.rng.choice(self.words) for _ in range(n))

    def text(self, n_tokens: int) -> str:
        if self.tokenizer is None:
            return self._words(max(1, round(n_tokens * WORDS_PER_TOKEN)))
        text = self._words(n_tokens)
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        while len(ids) < n_tokens:  # words shorter than a token on average: top up
            text += " " + self._words(n_tokens - len(ids))
            ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return self.tokenizer.decode(ids[:n_tokens])

    def count(self, text: str) -> int | None:
        if self.tokenizer is None:
            return None
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)
