"""Run the model on one rank: own the weights' shards and the KV cache, execute steps.

Rank 0 packs each step's inputs into one int64 vector and broadcasts it over the process
group; ranks 1..N-1 sit in `run_worker`, unpack and run the same forward pass, joining
the all-reduces and the logits gather. The same code runs on gloo and NCCL.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from models.attention import AttentionMetadata
from models.config import ModelConfig
from models.engine_config import EngineConfig
from models.tp import ParallelContext, broadcast_ints, destroy_parallel
from models.weights import load_model

_HEADER_LEN = 6
_CMD_STEP, _CMD_SHUTDOWN = 1, 2


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
                0,
            ]
        )
        payload = torch.tensor(
            self.input_ids
            + self.positions
            + self.slot_mapping
            + self.query_lens
            + self.context_lens
            + flat
            + self.logits_indices,
            dtype=torch.int64,
        )
        return header, payload

    @classmethod
    def unpack(cls, header: list[int], payload: list[int]) -> StepBatch:
        _, t, s, width, n_logits, _ = header
        cuts = [t, t, t, s, s, s * width, n_logits]
        parts, pos = [], 0
        for size in cuts:
            parts.append(payload[pos : pos + size])
            pos += size
        tables = [parts[5][i * width : (i + 1) * width] for i in range(s)]
        return cls(parts[0], parts[1], parts[2], parts[3], parts[4], tables, parts[6])


def payload_length(header: list[int]) -> int:
    _, t, s, width, n_logits, _ = header
    return 3 * t + 2 * s + s * width + n_logits


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
            broadcast_ints(header, self.parallel, _HEADER_LEN)
            broadcast_ints(payload, self.parallel, payload.numel())
        return self._forward(batch)

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
        hidden = self.model(ints(batch.input_ids), ints(batch.positions), self.kv_caches, meta)
        return self.model.compute_logits(hidden[ints(batch.logits_indices)])

    @torch.inference_mode()
    def serve_forever(self) -> None:
        """Ranks 1..N-1: follow rank 0's steps until it says shutdown."""
        while True:
            header = broadcast_ints(None, self.parallel, _HEADER_LEN).tolist()
            if header[0] == _CMD_SHUTDOWN:
                return
            payload = broadcast_ints(None, self.parallel, payload_length(header)).tolist()
            self._forward(StepBatch.unpack(header, payload))

    def shutdown(self) -> None:
        """Rank 0 releases the followers; every rank leaves the process group."""
        if self.parallel.world_size > 1 and self.parallel.is_driver:
            stop = torch.tensor([_CMD_SHUTDOWN, 0, 0, 0, 0, 0])
            broadcast_ints(stop, self.parallel, _HEADER_LEN)
        destroy_parallel(self.parallel)


def run_worker(config: EngineConfig, parallel: ParallelContext) -> None:
    """Entry point for ranks 1..N-1; returns when rank 0 shuts the group down."""
    runner = ModelRunner(config, parallel)
    try:
        runner.serve_forever()
    finally:
        destroy_parallel(parallel)
