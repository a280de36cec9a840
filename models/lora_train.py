"""LoRA for training: trainable A/B pairs over a frozen base, a forward that backprops, and
the checkpoint in PEFT's format.

The serving forward (models/llama.py) writes a paged KV cache in place and so cannot
backprop; training runs the same modules and weights (the base model the engine loads,
its RMSNorms, RoPE, fused q/k/v and gate/up matmuls) over a right-padded batch with plain
causal attention. Right padding needs no mask: a real token never attends to a later
position, and padded positions carry no loss. Each LoRA delta is added to its slice of the
fused output exactly as models/lora_slots.py adds a served adapter's (scaling alpha / r on
B A x), and the saved tensors carry PEFT's names and shapes, so `peft` loads the directory
as it is and the engine's loader (models/lora_files.py) serves it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from models.llama import MLP, Attention, DecoderLayer, LlamaModel, apply_rope
from models.lora_files import CONFIG_FILE, TARGETS, WEIGHTS_FILE, base_shapes

_PARENT = {t: "mlp" if t in ("gate_proj", "up_proj", "down_proj") else "self_attn" for t in TARGETS}


@dataclass(frozen=True)
class LoRAShape:
    """What to train: rank, alpha and the projections (PEFT's target_modules)."""

    r: int
    alpha: float
    targets: tuple[str, ...]

    def __post_init__(self) -> None:
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"LoRA targets must be a non-empty subset of {TARGETS}: {unknown}")
        if self.r < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {self.r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def peft_key(layer: int, target: str, which: str) -> str:
    """The tensor's name in a PEFT checkpoint of a Llama-family model."""
    return f"base_model.model.model.layers.{layer}.{_PARENT[target]}.{target}.lora_{which}.weight"


class TrainableLoRA(nn.Module):
    """A (r x in) and B (out x r) per (layer, target), initialised as PEFT does: A
    Kaiming-uniform, B zero, so training starts from the base model exactly."""

    def __init__(self, model: LlamaModel, shape: LoRAShape) -> None:
        super().__init__()
        self.shape = shape
        fans = base_shapes(model.config)
        device = model.embed_tokens.weight.device
        self.a = nn.ParameterDict()
        self.b = nn.ParameterDict()
        for layer in range(model.config.num_hidden_layers):
            for target in shape.targets:
                fan_in, fan_out = fans[target]
                a = torch.empty(shape.r, fan_in, device=device)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                self.a[f"{layer}_{target}"] = nn.Parameter(a)
                self.b[f"{layer}_{target}"] = nn.Parameter(
                    torch.zeros(fan_out, shape.r, device=device)
                )

    def delta(self, layer: int, target: str, x: torch.Tensor) -> torch.Tensor | None:
        key = f"{layer}_{target}"
        if key not in self.a:
            return None
        return (x @ self.a[key].t()) @ self.b[key].t() * self.shape.scaling

    def save_peft(self, directory: Path, base_model_name_or_path: str) -> Path:
        """adapter_config.json + adapter_model.safetensors, as `save_pretrained` writes."""
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for key in self.a:
            layer, target = key.split("_", 1)
            tensors[peft_key(int(layer), target, "A")] = self.a[key].detach().cpu().contiguous()
            tensors[peft_key(int(layer), target, "B")] = self.b[key].detach().cpu().contiguous()
        save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path,
            "r": self.shape.r,
            "lora_alpha": self.shape.alpha,
            "lora_dropout": 0.0,
            "target_modules": list(self.shape.targets),
            "bias": "none",
            "use_rslora": False,
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "inference_mode": True,
            "modules_to_save": None,
        }
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        return directory

    @torch.no_grad()
    def load_peft(self, directory: Path) -> None:
        """Continue from a checkpoint this class saved (resuming a job)."""
        tensors = load_file(directory / WEIGHTS_FILE)
        for key in self.a:
            layer, target = key.split("_", 1)
            self.a[key].copy_(tensors[peft_key(int(layer), target, "A")])
            self.b[key].copy_(tensors[peft_key(int(layer), target, "B")])


def _add(
    out: torch.Tensor,
    lora: TrainableLoRA,
    layer: int,
    x: torch.Tensor,
    targets: tuple[str, ...],
    widths: tuple[int, ...],
) -> torch.Tensor:
    """The fused projection's output with each target's delta added to its slice."""
    pieces, start = [], 0
    for target, width in zip(targets, widths, strict=True):
        piece = out[..., start : start + width]
        delta = lora.delta(layer, target, x)
        pieces.append(piece if delta is None else piece + delta)
        start += width
    return torch.cat(pieces, dim=-1)


def _attention(
    attn: Attention,
    lora: TrainableLoRA,
    layer: int,
    h: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> torch.Tensor:
    batch, length, _ = h.shape
    qkv = F.linear(h, attn.qkv_proj.weight, attn.qkv_proj.bias)
    qkv = _add(qkv, lora, layer, h, ("q_proj", "k_proj", "v_proj"), attn.split)
    q, k, v = qkv.split(attn.split, dim=-1)
    q = apply_rope(q.view(batch, length, attn.num_heads, attn.head_dim), cos, sin)
    k = apply_rope(k.view(batch, length, attn.num_kv_heads, attn.head_dim), cos, sin)
    v = v.view(batch, length, attn.num_kv_heads, attn.head_dim)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        is_causal=True,
        scale=attn.scale,
        enable_gqa=attn.num_kv_heads != attn.num_heads,
    )
    flat = out.transpose(1, 2).reshape(batch, length, -1)
    o = F.linear(flat, attn.o_proj.weight)
    delta = lora.delta(layer, "o_proj", flat)
    return o if delta is None else o + delta


def _mlp(mlp: MLP, lora: TrainableLoRA, layer: int, h: torch.Tensor) -> torch.Tensor:
    half = mlp.down_proj.weight.shape[1]
    gate_up = F.linear(h, mlp.gate_up_proj.weight, mlp.gate_up_proj.bias)
    gate_up = _add(gate_up, lora, layer, h, ("gate_proj", "up_proj"), (half, half))
    gate, up = gate_up.chunk(2, dim=-1)
    hidden = F.silu(gate) * up
    down = F.linear(hidden, mlp.down_proj.weight)
    delta = lora.delta(layer, "down_proj", hidden)
    return down if delta is None else down + delta


def train_forward(model: LlamaModel, lora: TrainableLoRA, input_ids: torch.Tensor) -> torch.Tensor:
    """Float32 logits [B, L, vocab] of a right-padded batch [B, L], on one rank (TP=1)."""
    if model.tp.world_size != 1:
        raise ValueError("training runs the model unsharded (tp_size 1)")
    length = input_ids.shape[1]
    x = F.embedding(input_ids, model.embed_tokens.weight)
    positions = torch.arange(length, device=input_ids.device)
    freqs = positions.float()[:, None] * model.inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [L, 1, D]
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    for i, module in enumerate(model.layers):
        layer = cast(DecoderLayer, module)
        x = x + _attention(layer.self_attn, lora, i, layer.input_layernorm(x), cos, sin)
        x = x + _mlp(layer.mlp, lora, i, layer.post_attention_layernorm(x))
    x = model.norm(x)
    weight = model.embed_tokens.weight if model.lm_head is None else model.lm_head
    return F.linear(x, weight).float()
