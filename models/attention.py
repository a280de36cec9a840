"""Attention over a paged KV cache.

The batch is a flat list of tokens from several sequences. Each sequence brings its new
tokens (a prefill chunk, or one decode token) and a block table pointing into the shared
cache. New keys and values are written through `slot_mapping`; each sequence then attends
over everything cached so far. Decode sequences are batched together; prefill chunks go
one by one, since each is already a sizeable matrix product.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Per-step layout of the flat token batch, shared by every layer."""

    slot_mapping: torch.Tensor  # [T] flat cache slot of each new token
    query_lens: list[int]  # new tokens per sequence
    context_lens: list[int]  # tokens cached after this step, per sequence
    block_tables: torch.Tensor  # [S, max_blocks] block ids (padded with 0)
    decode_rows: torch.Tensor  # sequence indices with exactly one new token
    decode_mask: torch.Tensor | None  # [D, 1, 1, L] True where a key is visible
    decode_max_blocks: int

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
        decode = [i for i, q in enumerate(query_lens) if q == 1]
        decode_rows = torch.tensor(decode, dtype=torch.long, device=device)
        mask = None
        max_blocks = 0
        if decode:
            lens = torch.tensor([context_lens[i] for i in decode], device=device)
            max_blocks = -(-int(lens.max()) // block_size)
            positions = torch.arange(max_blocks * block_size, device=device)
            mask = (positions[None, :] < lens[:, None])[:, None, None, :]
        return cls(
            slot_mapping, query_lens, context_lens, block_tables, decode_rows, mask, max_blocks
        )


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
    _num_blocks, block_size, kv_heads, head_dim = k_cache.shape
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k)
    v_cache.view(-1, kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v)

    out = torch.empty_like(q)
    starts = _prefix_sums(meta.query_lens)
    for seq, n_new in enumerate(meta.query_lens):
        if n_new == 1:
            continue
        start, ctx = starts[seq], meta.context_lens[seq]
        n_blocks = -(-ctx // block_size)
        table = meta.block_tables[seq, :n_blocks]
        keys = k_cache[table].reshape(-1, kv_heads, head_dim)[:ctx]
        values = v_cache[table].reshape(-1, kv_heads, head_dim)[:ctx]
        out[start : start + n_new] = _prefill_attention(
            q[start : start + n_new], keys, values, ctx, scale
        )

    if meta.decode_mask is not None:
        rows = meta.decode_rows
        token_index = torch.tensor([starts[int(r)] for r in rows], device=q.device)
        tables = meta.block_tables[rows, : meta.decode_max_blocks]
        d = rows.numel()
        keys = k_cache[tables].reshape(d, -1, kv_heads, head_dim).transpose(1, 2)
        values = v_cache[tables].reshape(d, -1, kv_heads, head_dim).transpose(1, 2)
        query = q[token_index].unsqueeze(2)  # [D, H, 1, Dh]
        attn = F.scaled_dot_product_attention(
            query,
            keys,
            values,
            attn_mask=meta.decode_mask,
            scale=scale,
            enable_gqa=kv_heads != q.shape[1],
        )
        out[token_index] = attn.squeeze(2)
    return out


def _prefill_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, ctx: int, scale: float
) -> torch.Tensor:
    """Causal attention of n new queries over ctx keys, the last n of which are theirs."""
    n = q.shape[0]
    query = q.transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
    key = keys.transpose(0, 1).unsqueeze(0)
    value = values.transpose(0, 1).unsqueeze(0)
    gqa = key.shape[1] != query.shape[1]
    if ctx == n:
        o = F.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scale, enable_gqa=gqa
        )
    else:
        q_pos = torch.arange(ctx - n, ctx, device=q.device)
        k_pos = torch.arange(ctx, device=q.device)
        mask = k_pos[None, :] <= q_pos[:, None]
        o = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, scale=scale, enable_gqa=gqa
        )
    return o.squeeze(0).transpose(0, 1)


def _prefix_sums(lengths: list[int]) -> list[int]:
    starts, total = [], 0
    for n in lengths:
        starts.append(total)
        total += n
    return starts
