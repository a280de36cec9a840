"""Adapter slots on the device and the batched LoRA matmuls that read them.

Each layer keeps, per fused projection group, one stack of A matrices [slots, in, k*R] and
one of B matrices [slots, k*R, out], zero-padded to R = max_lora_rank (so a rank-4 and a
rank-16 adapter share one shape) with the adapter's scaling folded into B. B is block
diagonal over the group's k sub-projections (q/k/v, gate/up), so one matmul writes every
output slice. A step groups its adapter tokens by slot into a padded [U, M, in] batch (U
slots, from the lowest the batch uses to the highest; M tokens of the busiest) and runs two
`torch.bmm`s over it, the weights a view of the stacks: S-LoRA's
segmented shape, reading each resident adapter once per step rather than once per token,
in a fixed handful of kernels whatever the mix, and never merging weights. Rows on the base
model are left out, and a batch with none on an adapter skips all of this. Prefill-sized
steps, whose tokens the engine sorts by slot, take long contiguous runs per adapter: those
loop over the runs and add into the output in place (SEGMENT_MIN_TOKENS).
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


# A step whose adapter tokens lie in runs of at least this many per adapter (prefill,
# with the engine's batch sorted by slot) loops over the runs: two matmuls each, added in
# place, instead of materialising a padded copy and a delta the size of the output.
SEGMENT_MIN_TOKENS = 64


@dataclass
class GroupStack:
    a: torch.Tensor  # [slots, in_local, len(targets) * R]
    b: torch.Tensor  # [slots, len(targets) * R, out_local], block diagonal, scaling folded in
    out_widths: tuple[int, ...]  # each target's share of out_local, in GROUPS order


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

        def stack(group: str, targets: tuple[str, ...]) -> GroupStack:
            widths = tuple(fan_out[t] for t in targets)
            inner = len(targets) * max_rank
            return GroupStack(
                torch.zeros(num_slots, fan_in[group], inner, dtype=dtype, device=tp.device),
                torch.zeros(num_slots, inner, sum(widths), dtype=dtype, device=tp.device),
                widths,
            )

        self.layers = [
            {group: stack(group, targets) for group, targets in GROUPS.items()}
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
                stack.b[slot].zero_()
                offset = 0
                for j, (target, out) in enumerate(zip(targets, stack.out_widths, strict=True)):
                    pair = weights.tensors.get((layer, target))
                    if pair is not None:
                        a, b = pair  # a [rank, in], b [out, rank]
                        inner = slice(j * width, j * width + rank)
                        stack.a[slot, :, inner].copy_(a.t())
                        stack.b[slot, inner, offset : offset + out].copy_(
                            b.float().t() * weights.scaling
                        )
                    offset += out
        self.targets[slot] = weights.targets


class LoRAStep:
    """One forward pass's adapter rows, grouped by slot (built once, read by every layer)."""

    def __init__(
        self,
        slots: LoRASlots,
        low: int,
        high: int,
        gather: torch.Tensor | None,
        keep: torch.Tensor | None,
        scatter: torch.Tensor | None,
        groups: frozenset[str],
        segments: list[tuple[int, int, int]] | None = None,
    ) -> None:
        self.slots = slots
        self.segments = segments  # (slot, start, end) runs of adapter tokens, when long
        self.low, self.high = low, high  # the span of slots the batch reads
        self.gather = gather  # the token behind each padded place; None: every token, in order
        self.keep = keep  # the padded places that are real rows; None: no padding
        self.scatter = scatter  # the token each real row adds to; None: every token, in order
        self.groups = groups  # projection groups some adapter in the batch targets

    @classmethod
    def build(
        cls, slots: LoRASlots, seq_slots: list[int], query_lens: list[int], device: torch.device
    ) -> LoRAStep | None:
        """None when no sequence runs an adapter (or none targets anything): the base-only
        forward then pays nothing for LoRA."""
        used = sorted({s for s in seq_slots if s >= 0})
        groups = frozenset(
            group
            for group, targets in GROUPS.items()
            if any(slots.targets[s].intersection(targets) for s in used)
        )
        if not groups:
            return None
        by_slot: dict[int, list[int]] = {s: [] for s in used}
        token = 0
        for slot, n in zip(seq_slots, query_lens, strict=True):
            if slot >= 0:
                by_slot[slot].extend(range(token, token + n))
            token += n
        order = [t for s in used for t in by_slot[s]]  # adapter tokens, slot by slot
        runs = [(s, by_slot[s][0], by_slot[s][-1] + 1) for s in used]
        if all(end - start == len(by_slot[s]) for s, start, end in runs) and len(
            order
        ) >= SEGMENT_MIN_TOKENS * len(used):
            return cls(slots, used[0], used[-1], None, None, None, groups, segments=runs)

        def ints(values: list[int]) -> torch.Tensor | None:
            if values == list(range(token)):
                return None  # the identity: no index op at all
            return torch.tensor(values, dtype=torch.long, device=device)

        # Every slot from the lowest used to the highest gets a group (an unused one only
        # padding), so the weights are a view of the stacks, never a per-step copy.
        low, high = used[0], used[-1]
        width = max(len(t) for t in by_slot.values())
        gather: list[int] = []
        keep: list[int] = []
        for place, slot in enumerate(range(low, high + 1)):
            tokens = by_slot.get(slot, [])
            # Padding repeats a real token: computed, then never read back.
            gather += tokens + [order[0]] * (width - len(tokens))
            keep += range(place * width, place * width + len(tokens))
        padding = len(gather) != len(order)
        keep_index = torch.tensor(keep, dtype=torch.long, device=device) if padding else None
        return cls(slots, low, high, ints(gather), keep_index, ints(order), groups)

    def layer(self, index: int) -> LayerLoRA:
        return LayerLoRA(self, index)

    def add(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """out[rows] += x[rows] · A[slot] · B[slot], every slot's rows in one bmm pair."""
        if group not in self.groups:
            return
        stack = self.slots.layers[layer][group]
        if self.segments is not None:  # long runs (prefill): add into `out` in place
            for slot, start, end in self.segments:
                shrunk = x[start:end] @ stack.a[slot]
                out[start:end].addmm_(shrunk, stack.b[slot])
            return
        xs = x if self.gather is None else x.index_select(0, self.gather)
        if self.low == self.high:  # one adapter in the batch: plain matmuls
            shrunk = xs @ stack.a[self.low]
            if self.scatter is None:
                out.addmm_(shrunk, stack.b[self.low])
                return
            delta = shrunk @ stack.b[self.low]
        else:
            span = slice(self.low, self.high + 1)
            grouped = xs.view(self.high + 1 - self.low, -1, xs.shape[-1])
            delta = torch.bmm(torch.bmm(grouped, stack.a[span]), stack.b[span])
            delta = delta.view(-1, out.shape[-1])
        if self.keep is not None:
            delta = delta.index_select(0, self.keep)
        if self.scatter is None:
            out += delta
        else:
            out.index_add_(0, self.scatter, delta)


@dataclass(frozen=True)
class LayerLoRA:
    """A step's adapters as one decoder layer sees them."""

    step: LoRAStep
    index: int

    def add(self, group: str, x: torch.Tensor, out: torch.Tensor) -> None:
        self.step.add(self.index, group, x, out)
