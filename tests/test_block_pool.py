"""Two-tier eviction in the block pool: blocks retained sequences released are evicted only
once no ordinary free block is left, and a prefix hit revives a block from either queue."""

from __future__ import annotations

from models.block_pool import BlockPool
from models.kv_manager import KVCacheManager
from models.request import Sequence
from models.sampling_params import SamplingParams


def _cached(pool: BlockPool, count: int, tag: str, retain: bool) -> list:
    blocks = pool.allocate(count)
    for i, block in enumerate(blocks):
        pool.register(block, f"{tag}-{i}".encode())
    pool.release(list(reversed(blocks)), retain=retain)
    return blocks


def test_ordinary_blocks_are_evicted_before_retained_ones() -> None:
    pool = BlockPool(6)
    kept = _cached(pool, 2, "conv", retain=True)  # freed first: LRU overall
    plain = _cached(pool, 2, "once", retain=False)
    assert pool.num_free == 6 and pool.num_retained_free == 2
    taken = pool.allocate(4)  # two never-used blocks, then the two ordinary cached ones
    assert set(plain) <= set(taken) and not set(kept) & set(taken)
    assert pool.lookup(b"once-0") is None and pool.lookup(b"once-1") is None
    assert pool.lookup(b"conv-0") is kept[0] and pool.lookup(b"conv-1") is kept[1]
    # Only with the ordinary queue empty does the retained queue give way, LRU first:
    # released tail-first, so the tail goes before the head.
    (evicted,) = pool.allocate(1)
    assert evicted is kept[1] and pool.lookup(b"conv-1") is None
    assert pool.lookup(b"conv-0") is kept[0] and pool.num_free == 1


def test_without_retain_the_oldest_prefix_goes_first() -> None:
    pool = BlockPool(6)
    first = _cached(pool, 2, "conv", retain=False)
    _cached(pool, 2, "once", retain=False)
    taken = pool.allocate(4)
    assert set(first) <= set(taken) and pool.lookup(b"conv-0") is None


def test_touch_revives_from_either_queue_and_counts_stay_right() -> None:
    pool = BlockPool(4)
    (kept,) = _cached(pool, 1, "conv", retain=True)
    (plain,) = _cached(pool, 1, "once", retain=False)
    pool.touch([kept, plain])
    assert kept.ref_cnt == plain.ref_cnt == 1
    assert pool.num_free == 2 and pool.num_used == 2 and pool.num_retained_free == 0
    pool.release([kept, plain])  # revived, then freed by an ordinary sequence: ordinary tier
    assert pool.num_retained_free == 0 and pool.num_free == 4


def test_a_block_a_retained_sequence_shared_stays_retained() -> None:
    """The tier follows whether a retained sequence let go, not who let go last."""
    pool = BlockPool(3)
    (block,) = pool.allocate(1)
    pool.register(block, b"shared")
    pool.touch([block])  # an ordinary request shares the prefix
    pool.release([block], retain=True)  # the conversation turn ends first
    pool.release([block])  # then the ordinary one: the block frees into the retained queue
    assert pool.num_retained_free == 1
    taken = pool.allocate(2)
    assert block not in taken and pool.lookup(b"shared") is block


def test_kv_manager_frees_a_retained_sequence_into_the_retained_queue() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4)
    params = SamplingParams(max_tokens=1)
    seqs = [
        Sequence(f"s{i}", f"r{i}", 0, list(range(10 * i, 10 * i + 8)), params, retain=retain)
        for i, retain in enumerate((True, False))
    ]
    for seq in seqs:
        assert kv.allocate(seq, seq.num_prompt_tokens)
        seq.num_computed_tokens = seq.num_prompt_tokens
        kv.cache_full_blocks(seq)
        kv.free(seq)
    assert kv.pool.num_retained_free == 2 and kv.num_free_blocks == 8
