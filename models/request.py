"""The engine's per-sequence state, a plain dataclass like vLLM v1's `Request`."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from models.lora import LoRARequest
from models.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One sample of one request. With n > 1 the siblings share the prompt's KV blocks."""

    seq_id: str
    request_id: str
    index: int
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    cache_salt: str | None = None
    retain: bool = False  # a conversation turn: free its blocks into the retained queue
    lora: LoRARequest | None = None  # the adapter it runs with; None = the base model
    arrival_time: float = field(default_factory=time.monotonic)
    leader: Sequence | None = None  # siblings wait until the leader's prompt is cached
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int | None = None  # prompt tokens served by the prefix cache
    status: SequenceStatus = SequenceStatus.WAITING
    generator: torch.Generator | None = None
    output_counts: dict[int, int] = field(default_factory=dict)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def lora_key(self) -> str | None:
        return self.lora.key if self.lora is not None else None

    @property
    def sort_key(self) -> tuple[int, float, int]:
        """Higher priority first, then first come first served."""
        return (-self.priority, self.arrival_time, self.index)

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.output_counts[token_id] = self.output_counts.get(token_id, 0) + 1

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
