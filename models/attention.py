"""Attention over a paged KV cache.

The batch is a flat list of tokens from several sequences. Each sequence brings its new
tokens (a prefill chunk, or one decode token) and a block table pointing into the shared
cache. New keys and values are written through `slot_mapping`; each sequence then attends
over its own cached context.

Prefill chunks attend one sequence at a time (each is already a sizeable product). Decode
tokens are sorted by context length and attended in small buckets: one padded call per
bucket keeps per-call overhead low without padding every sequence to the longest one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

DECODE_BUCKET = 8


@dataclass
class DecodeBucket:
    """Decode sequences of similar length, attended in one padded call."""

    token_index: torch.Tensor  # [B] rows of the flat batch
    block_ids: torch.Tensor  # [B, max_blocks] (padded with each row's last block)
    mask: torch.Tensor  # [B, 1, 1, max_blocks * block_size] True where a key is real


@dataclass
class AttentionMetadata:
    """Per-step layout of the flat token batch, shared by every layer."""

    slot_mapping: torch.Tensor  # [T] flat cache slot of each new token
    prefills: list[tuple[int, int, torch.Tensor]]  # (token start, new tokens, block ids)
    context_lens: dict[int, int]  # token start -> context length, for prefills
    decode_buckets: list[DecodeBucket]

    @classmethod
    def build(
        cls,
        slot_mapping: torch.Tensor,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: torch.Tensor,
        block_size: int,
    ) -> AttentionMetadata:
        device = block_tables.device
        prefills, ctx_of, decodes = [], {}, []
        start = 0
        for seq, (n_new, ctx) in enumerate(zip(query_lens, context_lens, strict=True)):
            n_blocks = -(-ctx // block_size)
            if n_new == 1:
                decodes.append((ctx, start, seq, n_blocks))
            else:
                prefills.append((start, n_new, block_tables[seq, :n_blocks]))
                ctx_of[start] = ctx
            start += n_new
        decodes.sort()
        buckets = []
        for i in range(0, len(decodes), DECODE_BUCKET):
            group = decodes[i : i + DECODE_BUCKET]
            width = group[-1][3]
            rows = torch.stack([block_tables[seq, :width] for _, _, seq, _ in group])
            lens = torch.tensor([ctx for ctx, _, _, _ in group], device=device)
            positions = torch.arange(width * block_size, device=device)
            buckets.append(
                DecodeBucket(
                    token_index=torch.tensor([s for _, s, _, _ in group], device=device),
                    block_ids=rows,
                    mask=(positions[None, :] < lens[:, None])[:, None, None, :],
                )
            )
        return cls(slot_mapping, prefills, ctx_of, buckets)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, KV, D]; caches: [blocks, block_size, KV, D] -> [T, H, D]."""
    kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k)
    v_cache.view(-1, kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v)
    out = torch.empty_like(q)
    gqa = kv_heads != q.shape[1]
    for start, n_new, blocks in meta.prefills:
        ctx = meta.context_lens[start]
        keys = _gather(k_cache, blocks).view(-1, kv_heads, head_dim)[:ctx]
        values = _gather(v_cache, blocks).view(-1, kv_heads, head_dim)[:ctx]
        out[start : start + n_new] = _prefill_attention(
            q[start : start + n_new], keys, values, scale, gqa
        )
    for bucket in meta.decode_buckets:
        rows = bucket.block_ids.shape[0]
        keys = _gather(k_cache, bucket.block_ids).view(rows, -1, kv_heads, head_dim)
        values = _gather(v_cache, bucket.block_ids).view(rows, -1, kv_heads, head_dim)
        keys, values = keys.transpose(1, 2), values.transpose(1, 2)
        query = q[bucket.token_index].unsqueeze(2)  # [B, H, 1, D]
        attn = F.scaled_dot_product_attention(
            query, keys, values, attn_mask=bucket.mask, scale=scale, enable_gqa=gqa
        )
        out[bucket.token_index] = attn.squeeze(2)
    return out


def _gather(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Copy whole blocks out of the cache; F.embedding is the fastest row gather on CPU
    (~2.5x fancy indexing, measured on the 2-core box)."""
    return F.embedding(block_ids, cache.view(cache.shape[0], -1))


def _prefill_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, gqa: bool
) -> torch.Tensor:
    """n new queries over ctx keys, the last n of which are their own positions."""
    n, ctx = q.shape[0], keys.shape[0]
    query = q.transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
    key = keys.transpose(0, 1).unsqueeze(0)
    value = values.transpose(0, 1).unsqueeze(0)
    if ctx == n:
        o = F.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scale, enable_gqa=gqa
        )
    else:
        q_pos = torch.arange(ctx - n, ctx, device=q.device)
        mask = torch.arange(ctx, device=q.device)[None, :] <= q_pos[:, None]
        o = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, scale=scale, enable_gqa=gqa
        )
    return o.squeeze(0).transpose(0, 1)
