"""A Llama-family transformer over a paged KV cache, sharded for tensor parallelism.

Short and plain in the spirit of gpt-fast's `model.py`. Layers are built with their local
shapes: q/k/v and gate/up are column shards (fused into one matmul each), o and down are row
shards followed by an all-reduce, and the embedding and lm_head are split over the vocab.
LoRA deltas (models/lora_slots.py) are added to each projection's local output, before the
all-reduce for the row-parallel ones, so every rank contributes its share.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from models.attention import AttentionMetadata, paged_attention
from models.config import ModelConfig
from models.linear import Linear, linear
from models.tp import ParallelContext, all_reduce, gather_vocab

if TYPE_CHECKING:  # lora_slots reads adapter files, whose loader imports this module
    from models.lora_slots import LayerLoRA, LoRAStep


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 as HF does, then cast back before the weight.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Rotary inverse frequencies, with Llama-3 long-context scaling when configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling
    if scaling.rope_type != "llama3":
        return inv_freq.float()
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's rotate-half convention; x: [T, heads, D], cos/sin: [T, 1, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, tp: ParallelContext) -> None:
        super().__init__()
        self.tp = tp
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads // tp.world_size
        self.num_kv_heads = config.num_key_value_heads // tp.world_size
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.split = (q_size, kv_size, kv_size)
        self.qkv_proj = Linear(config.hidden_size, sum(self.split), bias=config.attention_bias)
        self.o_proj = Linear(q_size, config.hidden_size, bias=False)
        self.scale = self.head_dim**-0.5

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        lora: LayerLoRA | None = None,
    ) -> torch.Tensor:
        tokens = x.shape[0]
        qkv = self.qkv_proj(x)
        if lora is not None:
            lora.add("qkv", x, qkv)
        q, k, v = qkv.split(self.split, dim=-1)
        q = apply_rope(q.view(tokens, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope(k.view(tokens, self.num_kv_heads, self.head_dim), cos, sin)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        out = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
        flat = out.reshape(tokens, -1)
        projected = self.o_proj(flat)
        if lora is not None:
            lora.add("o", flat, projected)
        return all_reduce(projected, self.tp)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, tp: ParallelContext) -> None:
        super().__init__()
        self.tp = tp
        local = config.intermediate_size // tp.world_size
        self.gate_up_proj = Linear(config.hidden_size, 2 * local, bias=config.mlp_bias)
        self.down_proj = Linear(local, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, lora: LayerLoRA | None = None) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if lora is not None:
            lora.add("gate_up", x, gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        hidden = F.silu(gate) * up
        out = self.down_proj(hidden)
        if lora is not None:
            lora.add("down", hidden, out)
        return all_reduce(out, self.tp)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, tp: ParallelContext) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, tp)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        lora: LayerLoRA | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, meta, lora)
        return x + self.mlp(self.post_attention_layernorm(x), lora)


class VocabParallelEmbedding(nn.Module):
    """Each rank holds a slice of the vocabulary; lookups outside it contribute zeros."""

    def __init__(self, vocab_size: int, dim: int, tp: ParallelContext) -> None:
        super().__init__()
        self.tp = tp
        self.shard_size = -(-vocab_size // tp.world_size)
        self.start = tp.rank * self.shard_size
        self.weight = nn.Parameter(torch.zeros(self.shard_size, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.shard_size)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return all_reduce(out, self.tp)


class LlamaModel(nn.Module):
    inv_freq: torch.Tensor  # a buffer (register_buffer), not a parameter

    def __init__(self, config: ModelConfig, tp: ParallelContext) -> None:
        super().__init__()
        config.check_tp(tp.world_size)
        self.config = config
        self.tp = tp
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(
            DecoderLayer(config, tp) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head: nn.Parameter | None = None
        if not config.tie_word_embeddings:
            self.lm_head = nn.Parameter(torch.zeros_like(self.embed_tokens.weight))
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        lora: LoRAStep | None = None,
    ) -> torch.Tensor:
        """Hidden states [T, hidden] for a flat batch of new tokens, each on its adapter."""
        x = self.embed_tokens(input_ids)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            x = layer(x, cos, sin, kv_cache, meta, lora.layer(i) if lora is not None else None)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Full-vocab float32 logits on rank 0 (None elsewhere)."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head
        local = linear(hidden, weight).float()
        return gather_vocab(local, self.tp, self.config.vocab_size)
