"""The slot-grouped LoRA kernel against the plain per-token formula, on batch shapes the
engine's reference tests do not reach: slot gaps inside the span, uneven counts (padding),
base tokens between adapter tokens, and one adapter over a subset of the rows."""

from __future__ import annotations

import pytest
import torch

from models.config import ModelConfig
from models.lora_files import AdapterWeights
from models.lora_slots import GROUPS, LoRASlots, LoRAStep
from models.tp import single_process

CONFIG = ModelConfig.from_dict(
    {
        "model_type": "llama",
        "vocab_size": 128,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
)
TARGETS = [t for targets in GROUPS.values() for t in targets]
SHAPES = {"q_proj": (32, 32), "k_proj": (32, 16), "v_proj": (32, 16), "o_proj": (32, 32)}
SHAPES |= {"gate_proj": (32, 48), "up_proj": (32, 48), "down_proj": (48, 32)}
FAN_IN = {"qkv": 32, "o": 32, "gate_up": 32, "down": 48}


def _adapter(seed: int, rank: int, targets: list[str]) -> AdapterWeights:
    g = torch.Generator().manual_seed(seed)
    tensors = {
        (layer, t): (
            torch.randn(rank, SHAPES[t][0], generator=g),
            torch.randn(SHAPES[t][1], rank, generator=g),
        )
        for layer in range(CONFIG.num_hidden_layers)
        for t in targets
    }
    return AdapterWeights(rank=rank, scaling=0.5 + seed, tensors=tensors)


def _expected(adapter: AdapterWeights | None, layer: int, group: str, x: torch.Tensor):
    """The group's output slices for one token: x·Aᵀ·Bᵀ·scaling per target, zeros for the
    base model and for targets the adapter lacks."""
    parts = []
    for t in GROUPS[group]:
        pair = None if adapter is None else adapter.tensors.get((layer, t))
        if pair is None:
            parts.append(torch.zeros(SHAPES[t][1]))
        else:
            a, b = pair
            parts.append((x @ a.t() @ b.t()) * adapter.scaling)  # type: ignore[union-attr]
    return torch.cat(parts)


@pytest.mark.parametrize(
    "seq_slots,query_lens",
    [
        ([2, -1, 0, 2, -1], [3, 1, 5, 1, 2]),  # a gap (slot 1), padding, base rows between
        ([3, 3], [2, 4]),  # one adapter on every row
        ([-1, 1, -1], [2, 3, 1]),  # one adapter on a subset of the rows
        ([0, 1, 2, 3, 0, 1, 2, 3], [1] * 8),  # the balanced decode mix: no padding
        ([0, 0, 2, -1], [40, 30, 80, 10]),  # long runs per slot (prefill): the segment path
    ],
)
def test_grouped_kernel_equals_the_per_token_formula(
    seq_slots: list[int], query_lens: list[int]
) -> None:
    slots = LoRASlots(CONFIG, single_process(), num_slots=4, max_rank=8, dtype=torch.float32)
    adapters = {
        0: _adapter(0, 8, TARGETS),
        1: _adapter(1, 4, ["q_proj", "v_proj", "down_proj"]),
        2: _adapter(2, 2, TARGETS),
        3: _adapter(3, 8, ["gate_proj", "o_proj"]),
    }
    for slot, weights in adapters.items():
        slots.fill(slot, weights)
    step = LoRAStep.build(slots, seq_slots, query_lens, torch.device("cpu"))
    assert step is not None
    assert (step.segments is not None) == (sum(query_lens) > 100)  # the path each case takes
    token_slots = [s for s, n in zip(seq_slots, query_lens, strict=True) for _ in range(n)]
    for layer in range(CONFIG.num_hidden_layers):
        for group, targets in GROUPS.items():
            width = sum(SHAPES[t][1] for t in targets)
            x = torch.randn(len(token_slots), FAN_IN[group])
            base = torch.randn(len(token_slots), width)
            out = base.clone()
            step.layer(layer).add(group, x, out)
            want = torch.stack(
                [
                    base[i] + _expected(adapters.get(s), layer, group, x[i])
                    for i, s in enumerate(token_slots)
                ]
            )
            torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-4)


def test_a_batch_on_the_base_model_builds_no_step() -> None:
    slots = LoRASlots(CONFIG, single_process(), num_slots=2, max_rank=8, dtype=torch.float32)
    slots.fill(0, _adapter(0, 8, TARGETS))
    assert LoRAStep.build(slots, [-1, -1], [3, 1], torch.device("cpu")) is None
    # A slot that was never filled targets nothing: still no step.
    assert LoRAStep.build(slots, [1, -1], [3, 1], torch.device("cpu")) is None
