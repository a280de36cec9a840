"""Tensor parallelism: process-group setup and the collectives the model needs.

One code path for every device: NCCL when the ranks sit on CUDA, gloo on CPU, and no
process group at all for world size 1. The layers themselves are plain `nn.Linear`s built
with their local (sharded) shapes, as in gpt-fast's `tp.py`; only the three collectives
below know about the other ranks.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from urllib.parse import urlsplit

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelContext:
    """Where this rank sits in its tensor-parallel group."""

    rank: int
    world_size: int
    device: torch.device
    group: dist.ProcessGroup | None = None

    @property
    def is_driver(self) -> bool:
        """Rank 0 runs the scheduler and sampler; the others only follow."""
        return self.rank == 0

    def shard(self, size: int, name: str = "dimension") -> tuple[int, int]:
        """This rank's [start, end) of an evenly split dimension."""
        if size % self.world_size:
            raise ValueError(f"{name}={size} is not divisible by tp_size={self.world_size}")
        part = size // self.world_size
        return self.rank * part, (self.rank + 1) * part


def single_process(device: str | torch.device = "cpu") -> ParallelContext:
    return ParallelContext(rank=0, world_size=1, device=torch.device(device))


RENDEZVOUS_TIMEOUT_S = 300.0


def init_parallel(
    rank: int,
    world_size: int,
    init_method: str,
    device: str,
    timeout_s: float = 120.0,
    rendezvous_timeout_s: float = RENDEZVOUS_TIMEOUT_S,
) -> ParallelContext:
    """Join the TP group; the backend follows the device so callers never choose it.

    `timeout_s` bounds each collective; the rendezvous at `init_method` (tcp://host:port
    on rank 0's node) waits `rendezvous_timeout_s` for the other ranks, since starting a
    rank (a new process, maybe on another node) can take longer than a collective may."""
    if world_size == 1:
        return single_process(device)
    torch_device = torch.device(device)
    if torch_device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))
        torch_device = torch.device("cuda", local)
        torch.cuda.set_device(torch_device)
    backend = "nccl" if torch_device.type == "cuda" else "gloo"
    if dist.is_initialized():
        dist.destroy_process_group()
    address = urlsplit(init_method)
    if address.scheme != "tcp" or address.hostname is None or address.port is None:
        raise ValueError(f"init_method must be tcp://host:port, got {init_method!r}")
    store = dist.TCPStore(
        address.hostname,
        address.port,
        world_size,
        is_master=rank == 0,
        timeout=datetime.timedelta(seconds=rendezvous_timeout_s),
    )
    dist.init_process_group(
        backend=backend,
        store=store,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return ParallelContext(rank, world_size, torch_device, dist.group.WORLD)


def destroy_parallel(ctx: ParallelContext) -> None:
    if ctx.group is not None and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """Sum row-parallel partial outputs across ranks, in place."""
    if ctx.world_size > 1:
        dist.all_reduce(x, group=ctx.group)
    return x


def gather_vocab(
    local_logits: torch.Tensor, ctx: ParallelContext, vocab_size: int
) -> torch.Tensor | None:
    """Concatenate vocab shards of the logits on rank 0; other ranks get None."""
    if ctx.world_size == 1:
        return local_logits[:, :vocab_size]
    local_logits = local_logits.contiguous()
    parts = (
        [torch.empty_like(local_logits) for _ in range(ctx.world_size)] if ctx.is_driver else None
    )
    dist.gather(local_logits, parts, dst=0, group=ctx.group)
    if not ctx.is_driver:
        return None
    assert parts is not None
    return torch.cat(parts, dim=-1)[:, :vocab_size]


def broadcast_ints(payload: torch.Tensor | None, ctx: ParallelContext, length: int) -> torch.Tensor:
    """Rank 0 sends an int64 vector of known length; the others receive it."""
    if ctx.is_driver:
        assert payload is not None and payload.numel() == length
        buf = payload.to(ctx.device)
    else:
        buf = torch.empty(length, dtype=torch.int64, device=ctx.device)
    dist.broadcast(buf, src=0, group=ctx.group)
    return buf

