"""The synchronous engine: requests in, one batched step at a time, deltas out.

`prepare` validates and tokenizes without touching engine state, so an async front end can
raise bad-input errors in the caller's thread and hand only valid work to the loop. Loading a
LoRA adapter splits the same way: `stage_lora` (fetch, validate, read; any thread) and
`install_lora` (every rank takes its slices; the engine's thread).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from models.detokenizer import IncrementalDetokenizer
from models.engine_config import EngineConfig
from models.errors import ContextLengthExceededError, InvalidRequestError, LoRALoadError
from models.kv_manager import KVCacheManager
from models.lora import LoRARequest
from models.lora_fetch import StagedAdapter, stage_adapter
from models.lora_manager import LoRAManager
from models.outputs import (
    CompletionDelta,
    EngineStats,
    FinishReason,
    RequestOutput,
    TokenLogprob,
    Usage,
)
from models.request import Sequence
from models.runner import ModelRunner, StepBatch
from models.sampler import SampledToken, make_generator, sample
from models.sampling_params import SamplingParams
from models.scheduler import Scheduler, SchedulerOutput
from models.tokenizer import Tokenizer
from models.tp import ParallelContext, single_process


@dataclass
class PreparedRequest:
    """A validated request, ready to enter the scheduler."""

    request_id: str
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer]


@dataclass
class _RequestState:
    prepared: PreparedRequest
    finish_reasons: dict[int, FinishReason] = field(default_factory=dict)

    @property
    def seqs(self) -> list[Sequence]:
        return self.prepared.seqs


class LLMEngine:
    def __init__(self, config: EngineConfig, parallel: ParallelContext | None = None) -> None:
        parallel = parallel or single_process(config.device)
        if parallel.world_size != config.tp_size:
            raise ValueError(f"tp_size={config.tp_size} but the group has {parallel.world_size}")
        self.config = config
        self.runner = ModelRunner(config, parallel)
        self.model_config = self.runner.model_config
        self.tokenizer = Tokenizer.from_pretrained(config.model)
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids) | frozenset(
            self.model_config.eos_token_ids
        )
        cache_tokens = self.runner.num_blocks * config.block_size
        self.max_model_len = min(
            config.max_model_len or self.model_config.max_position_embeddings,
            self.model_config.max_position_embeddings,
            cache_tokens,
        )
        self.kv = KVCacheManager(
            self.runner.num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.loras = (
            LoRAManager(
                self.runner,
                config.max_loras,
                config.cpu_lora_capacity,
                lambda: self.scheduler.adapter_keys(),
            )
            if config.max_loras
            else None
        )
        self.scheduler = Scheduler(
            self.kv, config.max_num_seqs, config.max_num_batched_tokens, self.loras
        )
        self._requests: dict[str, _RequestState] = {}
        self._generated: deque[tuple[float, int]] = deque()
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self._last_batch_size = 0

    # ---- requests -------------------------------------------------------------------
    def prepare(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        *,
        priority: int = 0,
        cache_salt: str | None = None,
        retain: bool = False,
        lora: LoRARequest | None = None,
    ) -> PreparedRequest:
        """Tokenize and check the prompt against the model; raises InvalidRequestError /
        ContextLengthExceededError. `params` validated itself when it was made, and a
        duplicate id is refused once, by `admit`, on the engine's own thread. `retain`
        (a turn of a stored conversation) keeps its KV blocks ahead of ordinary ones in
        eviction, so the next turn's prefix is likelier still cached. `lora` runs the
        request on that adapter; `admit` loads it if it is not in memory."""
        if lora is not None:
            self._require_loras()
        token_ids = self._tokenize(prompt)
        total = len(token_ids) + params.max_tokens
        if total > self.max_model_len:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {self.max_model_len} tokens. "
                f"However, you requested {total} tokens ({len(token_ids)} in the prompt, "
                f"{params.max_tokens} in the completion). Please reduce the prompt or max_tokens."
            )
        seqs: list[Sequence] = []
        for index in range(params.n):
            seqs.append(
                Sequence(
                    seq_id=f"{request_id}#{index}",
                    request_id=request_id,
                    index=index,
                    prompt_token_ids=token_ids,
                    params=params,
                    priority=priority,
                    cache_salt=cache_salt,
                    retain=retain,
                    lora=lora,
                    leader=seqs[0] if index else None,
                    generator=make_generator(params.seed, index),
                )
            )
        detoks = [IncrementalDetokenizer(self.tokenizer, token_ids, params.stop) for _ in seqs]
        return PreparedRequest(request_id, seqs, detoks)

    def _tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            token_ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, list) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            token_ids = list(prompt)
            bad = [t for t in token_ids if not 0 <= t < self.model_config.vocab_size]
            if bad:
                raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary", "prompt")
        else:
            raise InvalidRequestError("prompt must be a string or a list of token ids", "prompt")
        if not token_ids:
            raise InvalidRequestError("the prompt is empty", "prompt")
        return token_ids

    def admit(self, prepared: PreparedRequest) -> None:
        if prepared.request_id in self._requests:
            raise InvalidRequestError(f"duplicate request id {prepared.request_id!r}", "request_id")
        lora = prepared.seqs[0].lora
        if lora is not None:
            self.load_lora(lora)  # normally already held; raises LoRALoadError
        self._requests[prepared.request_id] = _RequestState(prepared)
        self._prompt_tokens_total += len(prepared.seqs[0].prompt_token_ids)
        for seq in prepared.seqs:
            self.scheduler.add(seq)

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        *,
        priority: int = 0,
        cache_salt: str | None = None,
        retain: bool = False,
        lora: LoRARequest | None = None,
    ) -> None:
        self.admit(
            self.prepare(
                request_id,
                prompt,
                params,
                priority=priority,
                cache_salt=cache_salt,
                retain=retain,
                lora=lora,
            )
        )

    # ---- LoRA adapters --------------------------------------------------------------
    def _require_loras(self) -> LoRAManager:
        if self.loras is None:
            raise LoRALoadError("LoRA adapters are disabled on this model (max_loras=0)", "model")
        return self.loras

    def lora_held(self, lora: LoRARequest) -> bool:
        """Whether that name and version is in CPU memory (safe from any thread)."""
        return self.loras is not None and self.loras.is_held(lora)

    def stage_lora(self, lora: LoRARequest) -> StagedAdapter:
        """Fetch, fully validate and read rank 0's slices; touches no engine state, so it
        runs off the engine thread. Raises LoRALoadError."""
        self._require_loras()
        return stage_adapter(lora, self.runner.adapter_rules, self.runner.parallel)

    def install_lora(self, staged: StagedAdapter) -> None:
        """Every rank takes its slices of a staged adapter (engine thread)."""
        self._require_loras().install(staged)

    def load_lora(self, lora: LoRARequest) -> float:
        """Stage and install in one go; seconds taken, 0.0 when already in memory. A new
        version under a held name replaces the old one."""
        start = time.monotonic()
        if self._require_loras().revive(lora):
            return 0.0
        self.install_lora(self.stage_lora(lora))
        return time.monotonic() - start

    def unload_lora(self, name: str) -> bool:
        """Stop serving `name`; requests already admitted with it finish on it first."""
        return self.loras is not None and self.loras.unload(name)

    def abort(self, request_id: str) -> None:
        """Drop a request at any moment; every block it held is freed."""
        state = self._requests.pop(request_id, None)
        if state is None:
            return
        for seq in state.seqs:
            self.scheduler.finish(seq)
        if self.loras is not None:
            self.loras.maybe_trim()

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    # ---- stepping -------------------------------------------------------------------
    def keep_alive(self) -> None:
        """Between steps: keep the TP followers' wait for the next step from timing out."""
        self.runner.keep_alive()

    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if not sched.chunks:
            return []
        batch, sampled_seqs = self._build_batch(sched)
        logits = self.runner.execute(batch)
        for chunk in sched.chunks:
            chunk.seq.num_computed_tokens += chunk.num_new_tokens
            self.kv.cache_full_blocks(chunk.seq)
        self._last_batch_size = len(sched.chunks)
        if not sampled_seqs:
            return []
        assert logits is not None
        tokens = sample(logits, sampled_seqs)
        self._count_generated(len(tokens))
        return self._process(sampled_seqs, tokens)

    def _build_batch(self, sched: SchedulerOutput) -> tuple[StepBatch, list[Sequence]]:
        bs = self.config.block_size
        batch = StepBatch([], [], [], [], [], [], [])
        sampled: list[Sequence] = []
        tables = []
        chunks = sched.chunks
        if any(chunk.seq.lora_key is not None for chunk in chunks):
            # Each adapter's tokens side by side: long runs take the LoRA kernels' segment
            # path, which adds into the output in place (models/lora_slots.py).
            chunks = sorted(chunks, key=lambda chunk: self._slot(chunk.seq))
            batch.lora_slots = [self._slot(chunk.seq) for chunk in chunks]
        for chunk in chunks:
            seq, start, n = chunk.seq, chunk.start, chunk.num_new_tokens
            table = self.kv.block_table(seq)
            tokens = seq.all_token_ids[start : start + n]
            batch.input_ids.extend(tokens)
            positions = range(start, start + n)
            batch.positions.extend(positions)
            batch.slot_mapping.extend(table[p // bs] * bs + p % bs for p in positions)
            batch.query_lens.append(n)
            batch.context_lens.append(start + n)
            tables.append(table)
            if chunk.completes_sequence:
                batch.logits_indices.append(len(batch.input_ids) - 1)
                sampled.append(seq)
        width = max(len(t) for t in tables)
        batch.block_tables = [t + [0] * (width - len(t)) for t in tables]
        return batch, sampled

    def _slot(self, seq: Sequence) -> int:
        if seq.lora_key is None:
            return -1
        assert self.loras is not None
        return self.loras.slot_of(seq.lora_key)

    def _process(self, seqs: list[Sequence], tokens: list[SampledToken]) -> list[RequestOutput]:
        by_request: dict[str, list[CompletionDelta]] = {}
        for seq, tok in zip(seqs, tokens, strict=True):
            state = self._requests.get(seq.request_id)
            if state is None:
                continue
            by_request.setdefault(seq.request_id, []).append(self._advance(state, seq, tok))
        outputs = []
        for request_id, deltas in by_request.items():
            state = self._requests[request_id]
            finished = len(state.finish_reasons) == len(state.seqs)
            outputs.append(RequestOutput(request_id, deltas, finished, self._usage(state)))
            if finished:
                del self._requests[request_id]
                if self.loras is not None and state.seqs[0].lora is not None:
                    self.loras.maybe_trim()
        return outputs

    def _advance(self, state: _RequestState, seq: Sequence, tok: SampledToken) -> CompletionDelta:
        """Append one sampled token to `seq` and decide whether it finished."""
        params = seq.params
        detok = state.prepared.detokenizers[seq.index]
        seq.append_token(tok.token_id)
        reason: FinishReason | None = None
        is_stop_token = tok.token_id in params.stop_token_ids or (
            not params.ignore_eos and tok.token_id in self.eos_token_ids
        )
        text = ""
        if is_stop_token:
            reason = "stop"
        else:
            text = detok.push(tok.token_id)
            if detok.stopped:
                reason = "stop"
        if reason is None and (
            len(seq.output_token_ids) >= params.max_tokens or seq.num_tokens >= self.max_model_len
        ):
            reason = "length"
        if reason is not None:
            if not detok.stopped:
                text += detok.flush()
            state.finish_reasons[seq.index] = reason
            self.scheduler.finish(seq)
        return CompletionDelta(
            index=seq.index,
            text=text,
            token_ids=[tok.token_id],
            logprobs=self._logprobs(tok) if params.logprobs is not None else None,
            finish_reason=reason,
        )

    def _logprobs(self, tok: SampledToken) -> list[TokenLogprob]:
        text = self.tokenizer.token_text
        top = [
            (i, text(i), lp)
            for i, lp in zip(tok.top_ids or [], tok.top_logprobs or [], strict=True)
        ]
        return [TokenLogprob(tok.token_id, text(tok.token_id), float(tok.logprob or 0.0), top)]

    def _usage(self, state: _RequestState) -> Usage:
        leader = state.seqs[0]
        return Usage(
            prompt_tokens=leader.num_prompt_tokens,
            completion_tokens=sum(len(s.output_token_ids) for s in state.seqs),
            cached_tokens=leader.num_cached_tokens or 0,
        )

    # ---- stats ----------------------------------------------------------------------
    def _count_generated(self, n: int) -> None:
        now = time.monotonic()
        self._generation_tokens_total += n
        self._generated.append((now, n))
        while self._generated and now - self._generated[0][0] > 10.0:
            self._generated.popleft()

    def stats(self) -> EngineStats:
        window = list(self._generated)
        rate = 0.0
        if len(window) > 1:
            span = max(window[-1][0] - window[0][0], 1e-6)
            rate = sum(n for _, n in window[1:]) / span
        stats = EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_blocks_used=self.kv.num_used_blocks,
            kv_blocks_total=self.runner.num_blocks,
            prefix_cache_queries=self.kv.queries,
            prefix_cache_hits=self.kv.hits,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens_total=self._prompt_tokens_total,
            generation_tokens_total=self._generation_tokens_total,
            tokens_per_s=rate,
            last_batch_size=self._last_batch_size,
            max_num_seqs=self.config.max_num_seqs,
        )
        if self.loras is not None:
            stats.lora_loads_total = self.loras.loads_total
            stats.lora_evictions_total = self.loras.evictions_total
            stats.lora_load_seconds_total = self.loras.load_seconds_total
            stats.lora_slots_used = self.loras.slots_used
            stats.lora_slots_total = self.loras.num_slots
            stats.loras_resident = self.loras.resident
        return stats

    def shutdown(self) -> None:
        for request_id in list(self._requests):
            self.abort(request_id)
        self.runner.shutdown()
