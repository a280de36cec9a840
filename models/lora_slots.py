"""Adapter slots on the device and the batched LoRA matmuls that read them.

Each layer keeps, per fused projection group, one stack of A matrices [slots, k*R, in] and
one stack of B matrices per sub-projection [slots, out, R], zero-padded to R = max_lora_rank
(so a rank-4 and a rank-16 adapter share one shape) with the adapter's scaling folded into B.
A step passes every token's slot; the adapter rows gather their own A and B from the stacks
and run two `torch.bmm`s (punica's BGMV shape: shrink x·Aᵀ to R, expand by B), so a batch
mixing any number of adapters costs the same few kernels and never merges weights. Rows on
the base model are left out, and a batch with none on an adapter skips all of this.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.config import ModelConfig
from models.lora_files import AdapterWeights
from models.tp import ParallelContext

# The engine fuses q/k/v and gate/up into one matmul each; their deltas go to output slices.
GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}


@dataclass
class _GroupStack:
    a: torch.Tensor  # [slots, len(targets) * R, in_local]
    bs: list[torch.Tensor]  # per target [slots, out_local, R], scaling folded in


class LoRASlots:
    """`num_slots` adapters resident on the device, each as this rank's slices."""

    def __init__(
        self,
        config: ModelConfig,
        tp: ParallelContext,
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
    ) -> None:
        self.max_rank = max_rank
        h, ws, d = config.hidden_size, tp.world_size, config.head_dim
        q, kv = config.num_attention_heads // ws * d, config.num_key_value_heads // ws * d
        inter = config.intermediate_size // ws
        fan_in = {"qkv": h, "o": q, "gate_up": h, "down": inter}
        fan_out = {"q_proj": q, "k_proj": kv, "v_proj": kv, "o_proj": h}
        fan_out |= {"gate_proj": inter, "up_proj": inter, "down_proj": h}

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(num_slots, *shape, dtype=dtype, device=tp.device)

        self.layers = [
            {
                group: _GroupStack(
                    zeros(len(targets) * max_rank, fan_in[group]),
                    [zeros(fan_out[t], max_rank) for t in targets],
                )
                for group, targets in GROUPS.items()
            }
            for _ in range(config.num_hidden_layers)
        ]
        self.targets: list[frozenset[str]] = [frozenset()] * num_slots

    @torch.no_grad()
    def fill(self, slot: int, weights: AdapterWeights) -> None:
        """Overwrite `slot` with an adapter; targets it lacks stay zero."""
        rank, width = weights.rank, self.max_rank
        for layer, stacks in enumerate(self.layers):
            for group, targets in GROUPS.items():
                stack = stacks[group]
                stack.a[slot].zero_()
                for j, target in enumerate(targets):
                    stack.bs[j][slot].zero_()
                    pair = weights.tensors.get((layer, target))
                    if pair is None:
                        continue
                    a, b = pair
                    stack.a[slot, j * width : j * width + rank].copy_(a)
                    stack.bs[j][slot, :, :rank].copy_(b.float() * weights.scaling)
        self.targets[slot] = weights.targets


class LoRAStep:
    """One forward pass's adapter rows: which tokens read which slot."""

    def __init__(
        self,
        slots: LoRASlots,
        rows: torch.Tensor | None,
        ids: torch.Tensor,
        groups: frozenset[str],
    ) -> None:
        self.slots = slots
        self.rows = rows  # token indices on an adapter; None when every token is
        self.ids = ids  # their slots
        self.groups = groups  # projection groups some adapter in the batch targets

    @classmethod
    def build(
        cls, slots: LoRASlots, seq_slots: list[int], query_lens: list[int], device: torch.device
    ) -> LoRAStep | None:
        """None when no sequence runs an adapter (or none targets anything): the base-only
        forward then pays nothing for LoRA."""
        used = {s for s in seq_slots if s >= 0}
        groups = frozenset(
            group
            for group, targets in GROUPS.items()
            if any(slots.targets[s].intersection(targets) for s in used)
        )
        if not groups:
            return None
        token_slots = [s for s, n in zip(seq_slots, query_lens, strict=True) for _ in range(n)]
        rows = [i for i, s in enumerate(token_slots) if s >= 0]
        ids = torch.tensor([token_slots[i] for i in rows], dtype=torch.long, device=device)
        if len(rows) == len(token_slots):
            return cls(slots, None, ids, groups)
        return cls(slots, torch.tensor(rows, dtype=torch.long, device=device), ids, groups)

    def layer(self, index: int) -> LayerLoRA:
        return LayerLoRA(self, index)

    def add(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """out[rows] += x[rows] · Aᵀ[slot] · Bᵀ[slot], per sub-projection slice of `out`."""
        if group not in self.groups:
            return
        stack = self.slots.layers[layer][group]
        rows_x = x if self.rows is None else x.index_select(0, self.rows)
        shrunk = torch.bmm(stack.a[self.ids], rows_x.unsqueeze(-1))  # [n, k*R, 1]
        width = self.slots.max_rank
        deltas = [
            torch.bmm(b[self.ids], shrunk[:, j * width : (j + 1) * width]).squeeze(-1)
            for j, b in enumerate(stack.bs)
        ]
        delta = deltas[0] if len(deltas) == 1 else torch.cat(deltas, dim=-1)
        if self.rows is None:
            out += delta
        else:
            out.index_add_(0, self.rows, delta)


@dataclass(frozen=True)
class LayerLoRA:
    """A step's adapters as one decoder layer sees them."""

    step: LoRAStep
    index: int

    def add(self, group: str, x: torch.Tensor, out: torch.Tensor) -> None:
        self.step.add(self.index, group, x, out)
