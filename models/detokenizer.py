"""Incremental detokenization with stop strings, for streaming.

Text is decoded over a short sliding window of tokens (vLLM's prefix/read offsets): a
delta is released only when the window no longer ends in a partial UTF-8 character, so
an emoji spread over four byte-level tokens comes out whole. `tokenizers.decoders.
DecodeStream` does the same, but hides the pending tokens, and `flush()` needs them.

Stop strings are searched across token boundaries. While running, the tail of the text
that could still become the start of a stop string is held back, so streamed text never
needs retracting; `flush()` releases it when the sequence ends for another reason.
"""

from __future__ import annotations

from collections.abc import Sequence

from models.tokenizer import Tokenizer

_CONTEXT_TOKENS = 5  # prompt tokens kept for tokenizers whose spacing depends on context
_REPLACEMENT = "\ufffd"  # what a decoder prints for an incomplete UTF-8 sequence


class IncrementalDetokenizer:
    """Turns one sequence's generated token ids into safe-to-stream text deltas."""

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
        self._stops = tuple(dict.fromkeys(s for s in stop if s))
        self._max_stop = max((len(s) for s in self._stops), default=0)
        self._emitted = 0
        self.text = ""
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text that is now safe to emit."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        delta = self._new_text(final=False)
        if not delta:
            return ""
        self._append(delta)
        if self.stopped:
            return self._release(len(self.text))
        return self._release(len(self.text) - self._partial_stop_len())

    def flush(self) -> str:
        """Release held-back text at the end; a trailing partial character is dropped."""
        if not self.stopped:
            delta = self._new_text(final=True)
            if delta:
                self._append(delta)
        return self._release(len(self.text))

    def _new_text(self, final: bool) -> str:
        """Text the tokens after the read offset add; "" while it ends mid-character."""
        window = self._ids[self._prefix_offset :]
        prefix = self._tok.decode(window[: self._read_offset - self._prefix_offset], self._skip)
        full = self._tok.decode(window, self._skip)
        if full.endswith(_REPLACEMENT):
            if not final:
                return ""  # wait for the bytes that complete the character
            full = full.rstrip(_REPLACEMENT)
        if len(full) <= len(prefix):
            return ""  # e.g. a skipped special token: nothing new yet
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return full[len(prefix) :]

    def _append(self, delta: str) -> None:
        """Add decoded text and cut it before the earliest stop string, if one appeared."""
        # A stop string that ends in the new text starts at most max_stop-1 chars before it.
        search_from = max(0, len(self.text) - self._max_stop + 1)
        self.text += delta
        hits = [i for s in self._stops if (i := self.text.find(s, search_from)) != -1]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def _partial_stop_len(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        for k in range(min(self._max_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self._stops):
                return k
        return 0

    def _release(self, upto: int) -> str:
        out = self.text[self._emitted : upto]
        self._emitted = max(self._emitted, upto)
        return out
