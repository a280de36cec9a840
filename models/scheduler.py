"""Iteration-level continuous batching, in the shape of vLLM v1's scheduler.

Every step the scheduler hands out a token budget: running sequences first (one decode
token each, or the next chunk of a long prefill), then waiting sequences in priority order
as long as KV blocks and `max_num_seqs` allow. When blocks run out, the lowest-priority
running sequence is preempted by recompute: its blocks are freed and it waits again.

With LoRA, running sequences use at most `max_loras` distinct adapters (one device slot
each). A waiting sequence whose adapter finds no slot keeps its place, and adapter
sequences behind it wait too (base-model ones still go): slots then free up as running
sequences finish, so it gets the next one instead of starving behind busier adapters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from models.kv_manager import KVCacheManager
from models.lora_manager import LoRAManager
from models.request import Sequence, SequenceStatus


@dataclass
class ScheduledChunk:
    """`num_new_tokens` tokens of `seq`, starting at its `num_computed_tokens`."""

    seq: Sequence
    start: int
    num_new_tokens: int

    @property
    def completes_sequence(self) -> bool:
        """After this chunk every known token is computed, so the next one is sampled."""
        return self.start + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.chunks)


class Scheduler:
    def __init__(
        self,
        kv: KVCacheManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        loras: LoRAManager | None = None,
    ) -> None:
        self.kv = kv
        self.loras = loras
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self.waiting.sort(key=lambda s: s.sort_key)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def adapter_keys(self, running_only: bool = False) -> set[str]:
        """The adapters live sequences use (running ones only, or waiting ones too)."""
        seqs = self.running if running_only else self.running + self.waiting
        return {s.lora_key for s in seqs if s.lora_key is not None}

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        self.running.sort(key=lambda s: s.sort_key)
        kept: list[Sequence] = []
        while self.running and budget > 0:
            seq = self.running.pop(0)
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            gave_way = False
            while not self.kv.allocate(seq, num_new):
                if not self.running:  # nothing lower-priority left: give way itself
                    self._preempt(seq, out)
                    gave_way = True
                    break
                self._preempt(self.running.pop(), out)
            if gave_way:
                break
            out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num_new))
            kept.append(seq)
            budget -= num_new
        self.running = kept + self.running
        if not out.preempted:
            self._admit_waiting(out, budget)
        return out

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        skipped: list[Sequence] = []
        slot_wait = False  # an adapter sequence found no slot: later adapter ones queue too
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting.pop(0)
            if seq.leader is not None and not _prompt_cached(seq.leader):
                skipped.append(seq)  # wait for the leader so siblings share its prompt blocks
                continue
            if seq.lora_key is not None and (slot_wait or not self._slot_for(seq.lora_key)):
                slot_wait = True
                skipped.append(seq)
                continue
            cached = self.kv.find_cached_prefix(seq) if seq.num_computed_tokens == 0 else []
            num_cached = len(cached) * self.kv.block_size
            num_new = min(seq.num_tokens - seq.num_computed_tokens - num_cached, budget)
            if not self.kv.allocate(seq, num_new, cached):
                self.waiting.insert(0, seq)
                break
            if seq.num_cached_tokens is None:
                seq.num_cached_tokens = num_cached
                if seq.leader is None:
                    self.kv.record_lookup(seq.num_prompt_tokens, num_cached)
            seq.num_computed_tokens += num_cached
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num_new))
            budget -= num_new
        self.waiting = skipped + self.waiting
        self.waiting.sort(key=lambda s: s.sort_key)

    def _slot_for(self, key: str) -> bool:
        assert self.loras is not None  # the engine refuses adapters when LoRA is off
        return self.loras.acquire_slot(key, self.adapter_keys(running_only=True))

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.insert(0, seq)
        self.waiting.sort(key=lambda s: s.sort_key)
        out.preempted.append(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Retire a sequence (finished or aborted) and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        self.kv.free(seq)


def _prompt_cached(leader: Sequence) -> bool:
    return leader.is_finished or leader.num_computed_tokens >= leader.num_prompt_tokens
