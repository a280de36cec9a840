"""Run the model on one rank: own the weights' shards and the KV cache, execute steps.

Rank 0 packs each step's inputs into one int64 vector and broadcasts it over the process
group; ranks 1..N-1 sit in `run_worker`, unpack and run the same forward pass, joining
the all-reduces and the logits gather. The same code runs on gloo and NCCL.

Followers wait for rank 0's next command in a broadcast that fails after the group's
collective timeout, so an idle rank 0 sends a heartbeat (a header with no work) whenever
a quarter of that timeout has passed since its last broadcast: an idle replica lives on.

LoRA commands travel the same way, in the order rank 0 issues them: load an adapter into
CPU memory (its directory and URI as bytes), drop it, or copy it into a device slot. A load
ends with an all-reduce of failure flags, so a follower that cannot read never brings the
group down and rank 0 knows when every rank is done with its temporary copy.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from models.attention import AttentionMetadata
from models.config import ModelConfig
from models.engine_config import EngineConfig
from models.errors import LoRALoadError
from models.lora_fetch import StagedAdapter, read_on_follower
from models.lora_files import AdapterRules, AdapterWeights
from models.lora_slots import LoRASlots, LoRAStep
from models.tp import ParallelContext, all_reduce, broadcast_ints, destroy_parallel
from models.weights import load_model

log = logging.getLogger(__name__)

_HEADER_LEN = 6
_CMD_STEP, _CMD_SHUTDOWN, _CMD_LORA, _CMD_HEARTBEAT = 1, 2, 3, 4
_LORA_LOAD, _LORA_DROP, _LORA_FILL = 1, 2, 3


@dataclass
class StepBatch:
    """Everything every rank needs for one forward pass, as flat integer lists."""

    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    logits_indices: list[int]
    lora_slots: list[int] = field(default_factory=list)  # per sequence, -1 = base; [] = none

    def pack(self) -> tuple[torch.Tensor, torch.Tensor]:
        width = max((len(t) for t in self.block_tables), default=0)
        tables = [t + [0] * (width - len(t)) for t in self.block_tables]
        flat = [b for t in tables for b in t]
        header = torch.tensor(
            [
                _CMD_STEP,
                len(self.input_ids),
                len(self.query_lens),
                width,
                len(self.logits_indices),
                len(self.lora_slots),
            ]
        )
        payload = torch.tensor(
            self.input_ids
            + self.positions
            + self.slot_mapping
            + self.query_lens
            + self.context_lens
            + flat
            + self.logits_indices
            + self.lora_slots,
            dtype=torch.int64,
        )
        return header, payload

    @classmethod
    def unpack(cls, header: list[int], payload: list[int]) -> StepBatch:
        _, t, s, width, n_logits, n_lora = header
        cuts = [t, t, t, s, s, s * width, n_logits, n_lora]
        parts, pos = [], 0
        for size in cuts:
            parts.append(payload[pos : pos + size])
            pos += size
        tables = [parts[5][i * width : (i + 1) * width] for i in range(s)]
        return cls(parts[0], parts[1], parts[2], parts[3], parts[4], tables, parts[6], parts[7])


def payload_length(header: list[int]) -> int:
    if header[0] == _CMD_HEARTBEAT:
        return 0
    if header[0] == _CMD_LORA:
        return header[4]  # the bytes of a load's directory and URI
    _, t, s, width, n_logits, n_lora = header
    return 3 * t + 2 * s + s * width + n_logits + n_lora


def adapter_rules(config: EngineConfig, model_config: ModelConfig) -> AdapterRules:
    """The base model's names an adapter's base_model_name_or_path may give."""
    names = {Path(config.model).name, config.served_model_name or ""} - {""}
    return AdapterRules(model_config, config.max_lora_rank, frozenset(names))


def pin_cpu(config: EngineConfig) -> None:
    """Optional CPU set and thread count, to emulate separate nodes on one box."""
    if config.cpu_affinity:
        os.sched_setaffinity(0, set(config.cpu_affinity))
    if config.num_threads:
        torch.set_num_threads(config.num_threads)


class ModelRunner:
    def __init__(self, config: EngineConfig, parallel: ParallelContext) -> None:
        pin_cpu(config)
        self.config = config
        self.parallel = parallel
        self.model_config = ModelConfig.from_pretrained(config.model)
        self.model = load_model(config.model, self.model_config, parallel, config.torch_dtype)
        self.num_blocks = self._num_blocks()
        shape = (
            self.num_blocks,
            config.block_size,
            self.model_config.num_key_value_heads // parallel.world_size,
            self.model_config.head_dim,
        )
        self.kv_caches = [
            (
                torch.zeros(shape, dtype=config.torch_dtype, device=parallel.device),
                torch.zeros(shape, dtype=config.torch_dtype, device=parallel.device),
            )
            for _ in range(self.model_config.num_hidden_layers)
        ]
        self.adapter_rules = adapter_rules(config, self.model_config)
        self.lora_slots = (
            LoRASlots(
                self.model_config,
                parallel,
                config.max_loras,
                config.max_lora_rank,
                config.torch_dtype,
            )
            if config.max_loras
            else None
        )
        self.adapters: dict[int, AdapterWeights] = {}  # this rank's CPU copies, by id
        self._heartbeat_s = config.collective_timeout_s / 4
        self._last_broadcast = time.monotonic()

    def _num_blocks(self) -> int:
        """Same on every rank: it depends only on the config and the local head count."""
        if self.config.num_kv_blocks:
            return self.config.num_kv_blocks
        mc, cfg = self.model_config, self.config
        local_kv = mc.num_key_value_heads // self.parallel.world_size
        elem = torch.tensor([], dtype=cfg.torch_dtype).element_size()
        per_block = 2 * mc.num_hidden_layers * cfg.block_size * local_kv * mc.head_dim * elem
        return max(2, cfg.kv_cache_memory_mb * 2**20 // per_block)

    @torch.inference_mode()
    def execute(self, batch: StepBatch) -> torch.Tensor | None:
        """Rank 0: broadcast the batch, run it, return logits [len(logits_indices), V]."""
        if self.parallel.world_size > 1:
            header, payload = batch.pack()
            self._broadcast(header)
            broadcast_ints(payload, self.parallel, payload.numel())
        return self._forward(batch)

    def _broadcast(self, header: torch.Tensor) -> None:
        """Rank 0 sends a command header; the followers are waiting for it."""
        broadcast_ints(header, self.parallel, _HEADER_LEN)
        self._last_broadcast = time.monotonic()

    def keep_alive(self) -> None:
        """Rank 0, between steps: a heartbeat when the followers have waited long enough
        that their wait could time out."""
        if self.parallel.world_size == 1:
            return
        if time.monotonic() - self._last_broadcast >= self._heartbeat_s:
            self._broadcast(torch.tensor([_CMD_HEARTBEAT, 0, 0, 0, 0, 0]))

    def _forward(self, batch: StepBatch) -> torch.Tensor | None:
        device = self.parallel.device

        def ints(values: list[int] | list[list[int]]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        meta = AttentionMetadata.build(
            ints(batch.slot_mapping),
            batch.query_lens,
            batch.context_lens,
            ints(batch.block_tables) if batch.block_tables else ints([]).view(0, 0),
            self.config.block_size,
        )
        lora = None
        if batch.lora_slots and self.lora_slots is not None:
            lora = LoRAStep.build(self.lora_slots, batch.lora_slots, batch.query_lens, device)
        hidden = self.model(
            ints(batch.input_ids), ints(batch.positions), self.kv_caches, meta, lora
        )
        return self.model.compute_logits(hidden[ints(batch.logits_indices)])

    # ---- LoRA (rank 0 calls these; followers replay them in serve_forever) ----------
    def load_adapter(self, adapter_id: int, staged: StagedAdapter) -> None:
        """Every rank reads its slices of an adapter rank 0 has validated into CPU memory;
        rank 0's temporary copy is removed once all have."""
        try:
            if self.parallel.world_size > 1:
                where = json.dumps([str(staged.copy.directory), staged.lora.path]).encode()
                self._command(_LORA_LOAD, adapter_id, 0, where)
                failed = self._count_failures(False)
                if failed:
                    raise LoRALoadError(
                        f"{failed} tensor-parallel rank(s) could not read adapter "
                        f"{staged.lora.key} from {staged.lora.path!r}"
                    )
            self.adapters[adapter_id] = staged.weights
        finally:
            staged.copy.release()

    def drop_adapter(self, adapter_id: int) -> None:
        self._command(_LORA_DROP, adapter_id, 0)
        self.adapters.pop(adapter_id, None)

    def fill_slot(self, slot: int, adapter_id: int) -> None:
        self._command(_LORA_FILL, adapter_id, slot)
        self._fill(slot, adapter_id)

    def _fill(self, slot: int, adapter_id: int) -> None:
        assert self.lora_slots is not None
        self.lora_slots.fill(slot, self.adapters[adapter_id])

    def _command(self, op: int, adapter_id: int, slot: int, data: bytes = b"") -> None:
        if self.parallel.world_size == 1:
            return
        self._broadcast(torch.tensor([_CMD_LORA, op, adapter_id, slot, len(data), 0]))
        if data:
            broadcast_ints(torch.tensor(list(data), dtype=torch.int64), self.parallel, len(data))

    def _count_failures(self, failed: bool) -> int:
        flags = torch.tensor([int(failed)], dtype=torch.int64, device=self.parallel.device)
        return int(all_reduce(flags, self.parallel).item())

    def _follow_lora(self, header: list[int], payload: list[int]) -> None:
        op, adapter_id, slot = header[1:4]
        if op == _LORA_DROP:
            self.adapters.pop(adapter_id, None)
        elif op == _LORA_FILL:
            self._fill(slot, adapter_id)
        else:
            directory, uri = json.loads(bytes(payload).decode())
            weights = None
            try:
                weights = read_on_follower(directory, uri, self.adapter_rules, self.parallel)
            except LoRALoadError:
                log.exception("rank %d could not read adapter %s", self.parallel.rank, uri)
            if not self._count_failures(weights is None) and weights is not None:
                self.adapters[adapter_id] = weights

    @torch.inference_mode()
    def serve_forever(self) -> None:
        """Ranks 1..N-1: follow rank 0's steps until it says shutdown."""
        while True:
            header = broadcast_ints(None, self.parallel, _HEADER_LEN).tolist()
            if header[0] == _CMD_SHUTDOWN:
                return
            if header[0] == _CMD_HEARTBEAT:
                continue
            length = payload_length(header)
            payload = broadcast_ints(None, self.parallel, length).tolist() if length else []
            if header[0] == _CMD_LORA:
                self._follow_lora(header, payload)
            else:
                self._forward(StepBatch.unpack(header, payload))

    def shutdown(self) -> None:
        """Rank 0 releases the followers; every rank leaves the process group."""
        if self.parallel.world_size > 1 and self.parallel.is_driver:
            self._broadcast(torch.tensor([_CMD_SHUTDOWN, 0, 0, 0, 0, 0]))
        destroy_parallel(self.parallel)


def run_worker(config: EngineConfig, parallel: ParallelContext) -> None:
    """Entry point for ranks 1..N-1; returns when rank 0 shuts the group down."""
    runner = ModelRunner(config, parallel)
    try:
        runner.serve_forever()
    finally:
        destroy_parallel(parallel)
