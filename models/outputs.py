"""What the engine hands back each step: plain dataclasses, cheap to pickle across Ray."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "abort"]


@dataclass
class TokenLogprob:
    """One generated token's logprob and the top alternatives, as OpenAI reports them."""

    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class CompletionDelta:
    """New output of one sample (`index` < n) since the previous step."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None


@dataclass
class RequestOutput:
    """Per-request result of one engine step; `finished` once every sample has finished."""

    request_id: str
    deltas: list[CompletionDelta]
    finished: bool
    usage: Usage


@dataclass
class EngineStats:
    """Load signals for routers, autoscalers and dashboards."""

    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    tokens_per_s: float = 0.0
    last_batch_size: int = 0
    max_num_seqs: int = 0
    lora_loads_total: int = 0  # adapters read from storage into CPU memory
    lora_evictions_total: int = 0  # adapters pushed out of a slot to make room for another
    lora_load_seconds_total: float = 0.0
    lora_slots_used: int = 0  # slots holding an adapter
    lora_slots_total: int = 0
    loras_resident: tuple[str, ...] = ()  # "name@version" of adapters held in CPU memory

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0

    @property
    def prefix_hit_rate(self) -> float:
        q = self.prefix_cache_queries
        return self.prefix_cache_hits / q if q else 0.0


def merge_outputs(outputs: list[RequestOutput]) -> RequestOutput:
    """Fold consecutive step outputs of one request into one, so a slow reader (e.g. a
    Ray stream) gets one message per read instead of one per engine step."""
    if len(outputs) == 1:
        return outputs[0]
    merged: dict[int, CompletionDelta] = {}
    for out in outputs:
        for d in out.deltas:
            m = merged.get(d.index)
            if m is None:
                merged[d.index] = CompletionDelta(
                    d.index,
                    d.text,
                    list(d.token_ids),
                    list(d.logprobs) if d.logprobs is not None else None,
                    d.finish_reason,
                )
                continue
            m.text += d.text
            m.token_ids.extend(d.token_ids)
            if d.logprobs is not None:
                m.logprobs = (m.logprobs or []) + d.logprobs
            m.finish_reason = d.finish_reason or m.finish_reason
    last = outputs[-1]
    return RequestOutput(last.request_id, list(merged.values()), last.finished, last.usage)
