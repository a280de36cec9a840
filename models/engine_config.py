"""Engine settings: one pydantic model so YAML, CLI and Ray all validate the same way."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class EngineConfig(BaseModel):
    """How one engine instance (one TP group) runs a checkpoint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="Path to an HF-format checkpoint directory.")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["cpu", "cuda"] = "cpu"
    tp_size: int = Field(1, ge=1)
    block_size: int = Field(16, ge=1, le=256)
    num_kv_blocks: int | None = Field(None, ge=2, description="Overrides kv_cache_memory_mb.")
    kv_cache_memory_mb: int = Field(256, ge=1)
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=16)
    max_model_len: int | None = Field(None, ge=16)
    enable_prefix_caching: bool = True
    num_threads: int | None = Field(None, ge=1, description="torch threads per rank (CPU).")
    cpu_affinity: list[int] | None = Field(None, description="CPU set per rank (CPU).")
    max_loras: int = Field(0, ge=0, description="LoRA adapter slots per replica (0 = off).")
    max_lora_rank: int = Field(16, ge=1, description="Largest adapter rank r accepted.")
    max_cpu_loras: int | None = Field(
        None, ge=1, description="Adapters kept in CPU memory (LRU); None = 2 * max(max_loras, 1)."
    )
    collective_timeout_s: float = Field(
        120.0, gt=0, description="How long a TP rank waits in one collective before failing."
    )
    served_model_name: str | None = Field(
        None, description="The base model's public name, checked against adapters' base."
    )

    @property
    def cpu_lora_capacity(self) -> int:
        """Adapters held in CPU memory: twice the slots by default, so a slot refill rarely
        has to go back to storage."""
        return self.max_cpu_loras or 2 * max(self.max_loras, 1)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]
