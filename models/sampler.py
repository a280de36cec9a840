"""Turn rank 0's logits into next tokens: penalties, temperature, top-k/top-p, seeds, logprobs.

Work is vectorised across the batch; only the draw itself is per row, because each seeded
request owns a `torch.Generator` so that its samples reproduce whatever else is batched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.request import Sequence


@dataclass
class SampledToken:
    token_id: int
    logprob: float | None = None
    top_ids: list[int] | None = None
    top_logprobs: list[float] | None = None


def make_generator(seed: int | None, index: int) -> torch.Generator | None:
    """A private generator per seeded sample; siblings get distinct streams."""
    if seed is None:
        return None
    gen = torch.Generator()
    gen.manual_seed((seed + index * 1_000_003) % (2**63))
    return gen


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[SampledToken]:
    """logits: [B, V] float32 on any device, one row per sequence in `seqs`."""
    logits = logits.float()
    want_logprobs = [s.params.logprobs for s in seqs]
    raw_logprobs = (
        torch.log_softmax(logits, dim=-1) if any(k is not None for k in want_logprobs) else None
    )
    logits = _apply_penalties(logits, seqs)

    chosen = logits.argmax(dim=-1)
    random_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if random_rows:
        probs = _filtered_probs(logits[random_rows], [seqs[i] for i in random_rows])
        for row, i in enumerate(random_rows):
            gen = seqs[i].generator
            p = probs[row]
            if gen is not None and p.device.type != "cpu":
                p = p.cpu()
            chosen[i] = torch.multinomial(p, 1, generator=gen).item()

    chosen_list = chosen.tolist()
    results = [SampledToken(t) for t in chosen_list]
    if raw_logprobs is not None:
        _attach_logprobs(results, raw_logprobs, chosen, want_logprobs)
    return results


def _apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """OpenAI semantics: subtract frequency × count and presence × [count > 0]."""
    rows = [
        i for i, s in enumerate(seqs) if s.params.presence_penalty or s.params.frequency_penalty
    ]
    if not rows:
        return logits
    logits = logits.clone()
    for i in rows:
        counts = seqs[i].output_counts
        if not counts:
            continue
        ids = torch.tensor(list(counts.keys()), device=logits.device)
        n = torch.tensor(list(counts.values()), dtype=logits.dtype, device=logits.device)
        p = seqs[i].params
        logits[i, ids] -= p.frequency_penalty * n + p.presence_penalty
    return logits


def _filtered_probs(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    temps = torch.tensor([s.params.temperature for s in seqs], device=logits.device)
    logits = logits / temps[:, None]
    top_ks = [s.params.top_k for s in seqs]
    if any(k > 0 for k in top_ks):
        vocab = logits.shape[-1]
        ks = torch.tensor([k if k > 0 else vocab for k in top_ks], device=logits.device)
        kth = logits.sort(dim=-1, descending=True).values.gather(
            1, (ks.clamp(max=vocab) - 1)[:, None]
        )
        logits = logits.masked_fill(logits < kth, float("-inf"))
    top_ps = torch.tensor([s.params.top_p for s in seqs], device=logits.device)
    if bool((top_ps < 1.0).any()):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Drop a token once the mass before it already reaches top_p; the top token always stays.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = mass_before >= top_ps[:, None]
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(dim=-1)


def _attach_logprobs(
    results: list[SampledToken],
    raw_logprobs: torch.Tensor,
    chosen: torch.Tensor,
    want: list[int | None],
) -> None:
    chosen_lp = raw_logprobs.gather(1, chosen[:, None]).squeeze(1).tolist()
    k_max = max(k for k in want if k is not None)
    top_vals, top_ids = raw_logprobs.topk(k_max, dim=-1) if k_max > 0 else (None, None)
    for i, k in enumerate(want):
        if k is None:
            continue
        results[i].logprob = chosen_lp[i]
        results[i].top_ids = top_ids[i, :k].tolist() if top_ids is not None else []
        results[i].top_logprobs = top_vals[i, :k].tolist() if top_vals is not None else []
