"""TP=2 in two processes over gloo gives TP=1's logits, and each rank holds only its shard."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.multiprocessing as mp

from models.engine_config import EngineConfig
from models.runner import ModelRunner, StepBatch
from models.tp import init_parallel, single_process
from tests.checkpoints import write_hf_checkpoint
from tests.ports import free_port

pytest.importorskip("transformers")


def _batch() -> StepBatch:
    """Two sequences: a 21-token prefill and a 9-token one, block size 16."""
    ids = list(range(5, 26)) + list(range(100, 109))
    positions = list(range(21)) + list(range(9))
    tables = [[4, 2], [7, 0]]
    slots = [tables[0][p // 16] * 16 + p % 16 for p in range(21)]
    slots += [tables[1][p // 16] * 16 + p % 16 for p in range(9)]
    return StepBatch(ids, positions, slots, [21, 9], [21, 9], tables, [20, 29])


def _rank_main(rank: int, port: int, config: EngineConfig, results: dict) -> None:
    ctx = init_parallel(rank, 2, f"tcp://127.0.0.1:{port}", "cpu", timeout_s=60)
    runner = ModelRunner(config, ctx)
    shapes = {n: tuple(p.shape) for n, p in runner.model.named_parameters()}
    numel = sum(p.numel() for p in runner.model.parameters())
    if rank == 0:
        logits = runner.execute(_batch())
        results[rank] = (shapes, numel, logits.clone())
        runner.shutdown()
    else:
        runner.serve_forever()
        results[rank] = (shapes, numel, None)


@pytest.mark.parametrize("tie", [False, True])
def test_tp2_matches_tp1_and_shards_weights(tmp_path: Path, tie: bool) -> None:
    ckpt = write_hf_checkpoint(tmp_path / "ckpt", kv_heads=2, tie=tie, vocab_size=511)
    single = ModelRunner(EngineConfig(model=str(ckpt), num_kv_blocks=16), single_process())
    want = single.execute(_batch())
    full_numel = sum(p.numel() for p in single.model.parameters())

    config = EngineConfig(model=str(ckpt), tp_size=2, num_kv_blocks=16)
    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    mp.start_processes(
        _rank_main, args=(free_port(), config, results), nprocs=2, start_method="spawn"
    )
    shapes0, numel0, got = results[0]
    shapes1, numel1, _ = results[1]
    assert (got - want).abs().max().item() <= 1e-4
    # Each rank holds half of every sharded matrix (vocab 511 pads to 2 × 256 rows).
    assert shapes0["layers.0.self_attn.qkv_proj.weight"] == (2 * 16 + 2 * 16, 64)
    assert shapes0["layers.0.self_attn.o_proj.weight"] == (64, 32)
    assert shapes0["layers.0.mlp.gate_up_proj.weight"] == (128, 64)
    assert shapes0["layers.0.mlp.down_proj.weight"] == (64, 64)
    assert shapes0["embed_tokens.weight"] == (256, 64)
    assert shapes0 == shapes1
    replicated = 64 * (1 + 2 * 2)  # final norm + two norms per layer
    assert numel0 == numel1
    assert numel0 - replicated <= (full_numel - replicated) // 2 + 64


def _late_rank_main(rank: int, port: int, results: dict) -> None:
    """Rank 1 dials in later than the collective timeout; then rank 0 waits alone in a
    collective, which must still fail after that (short) timeout."""
    import time

    import torch
    import torch.distributed as dist

    if rank == 1:
        time.sleep(3.0)
    ctx = init_parallel(rank, 2, f"tcp://127.0.0.1:{port}", "cpu", timeout_s=1.0)
    total = torch.ones(1)
    dist.all_reduce(total, group=ctx.group)
    if rank == 0:
        started = time.monotonic()
        try:
            dist.broadcast(torch.zeros(1), src=1, group=ctx.group)
        except RuntimeError:
            results["alone_failed_after_s"] = time.monotonic() - started
        results["sum"] = total.item()
    else:
        time.sleep(4.0)  # rank 0's broadcast gets no partner until it has timed out


def test_a_rank_that_starts_late_still_joins_and_collectives_keep_their_timeout() -> None:
    """Starting a rank (a new process, maybe on another node) can take longer than one
    collective may wait; the rendezvous has its own deadline."""
    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    mp.start_processes(
        _late_rank_main, args=(free_port(), results), nprocs=2, start_method="spawn"
    )
    assert results["sum"] == 2.0
    assert 0.5 <= results["alone_failed_after_s"] <= 3.5
