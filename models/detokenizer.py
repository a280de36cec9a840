"""Incremental detokenization with stop strings, for streaming.

Text is decoded over a short sliding window of tokens (vLLM's prefix/read offsets), and a
delta is released only when it does not end in a partial UTF-8 character. While running,
the last `max_stop_len - 1` characters are held back: they might be the start of a stop
string, and streamed text must never need retracting.
"""

from __future__ import annotations

from collections.abc import Sequence

from models.tokenizer import Tokenizer

_CONTEXT_TOKENS = 5  # prompt tokens kept for tokenizers whose spacing depends on context
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stops = [s for s in stop if s]
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self.text = ""
        self._emitted = 0
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text that is now safe to emit."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        prefix = self._tok.decode(self._ids[self._prefix_offset : self._read_offset], self._skip)
        full = self._tok.decode(self._ids[self._prefix_offset :], self._skip)
        if len(full) <= len(prefix) or full.endswith(_REPLACEMENT):
            return ""  # an incomplete character: wait for the next token
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return self._append(full[len(prefix) :])

    def flush(self) -> str:
        """Release held-back text (and any trailing partial character) at the end."""
        if not self.stopped:
            prefix = self._tok.decode(
                self._ids[self._prefix_offset : self._read_offset], self._skip
            )
            full = self._tok.decode(self._ids[self._prefix_offset :], self._skip)
            if len(full) > len(prefix):
                self.text += full[len(prefix) :]
            self._prefix_offset = self._read_offset = len(self._ids)
        out = self.text[self._emitted :]
        self._emitted = len(self.text)
        return out

    def _append(self, delta: str) -> str:
        search_from = max(0, len(self.text) - self._hold)
        self.text += delta
        hits = [i for s in self._stops if (i := self.text.find(s, search_from)) != -1]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
            safe = len(self.text)
        else:
            safe = max(self._emitted, len(self.text) - self._hold)
        out = self.text[self._emitted : safe]
        self._emitted = safe
        return out
