"""Per-request sampling parameters, validated up front so bad input never reaches the batch."""

from __future__ import annotations

from dataclasses import dataclass, field

from models.errors import InvalidRequestError

MAX_TOP_LOGPROBS = 20


@dataclass
class SamplingParams:
    """What OpenAI's completion parameters mean to the engine.

    `logprobs=None` returns none; `logprobs=k` returns the chosen token's logprob plus the
    top k alternatives (k may be 0).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    n: int = 1

    def __post_init__(self) -> None:
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def validate(self) -> None:
        """Raise InvalidRequestError naming the offending parameter."""
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
            raise InvalidRequestError("'stop' must be a string or a list of strings", "stop")
        if any(s == "" for s in self.stop):
            raise InvalidRequestError("'stop' strings must not be empty", "stop")
        if len(self.stop) > 4:
            raise InvalidRequestError("'stop' takes at most 4 sequences", "stop")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in self.stop_token_ids):
            raise InvalidRequestError("'stop_token_ids' must be integers", "stop_token_ids")
        _check_int(self.max_tokens, "max_tokens", low=1)
        _check_int(self.n, "n", low=1, high=128)
        _check_float(self.temperature, "temperature", low=0.0, high=2.0)
        _check_float(self.top_p, "top_p", low=0.0, high=1.0)
        if self.top_p <= 0.0:
            raise InvalidRequestError("'top_p' must be in (0, 1]", "top_p")
        _check_int(self.top_k, "top_k", low=0)
        _check_float(self.presence_penalty, "presence_penalty", low=-2.0, high=2.0)
        _check_float(self.frequency_penalty, "frequency_penalty", low=-2.0, high=2.0)
        if self.seed is not None:
            _check_int(self.seed, "seed", low=-(2**63), high=2**63 - 1)
        if self.logprobs is not None:
            _check_int(self.logprobs, "top_logprobs", low=0, high=MAX_TOP_LOGPROBS)


def _check_int(value: object, name: str, low: int, high: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequestError(f"'{name}' must be an integer, got {value!r}", name)
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"between {low} and {high}"
        raise InvalidRequestError(f"'{name}' must be {bounds}, got {value}", name)


def _check_float(value: object, name: str, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequestError(f"'{name}' must be a number, got {value!r}", name)
    if not (low <= float(value) <= high):
        raise InvalidRequestError(f"'{name}' must be between {low} and {high}, got {value}", name)
