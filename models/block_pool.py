"""The pool of KV-cache blocks: reference counts, the prefix-cache index and LRU eviction.

A block with ref_cnt 0 sits in a free queue but keeps its contents and hash, so a later
request with the same prefix can revive it. Allocation takes the least recently freed block
and only then forgets its hash (eviction).

There are two free queues. Blocks a retained sequence (a stored conversation likely to be
continued) released go to the retained queue; every other free block goes to the ordinary
one. Allocation drains the ordinary queue first, so a burst of one-off requests evicts
other one-off prefixes before it touches a conversation's prefix.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None
    # A retained sequence released it since it last left a free queue: it frees into the
    # retained queue even when an ordinary sequence sharing it lets go last.
    retained: bool = False


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._retained: OrderedDict[int, KVBlock] = OrderedDict()
        self._cached: dict[bytes, KVBlock] = {}

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._retained)

    @property
    def num_retained_free(self) -> int:
        """Free blocks in the retained queue (evicted only once the ordinary one is empty)."""
        return len(self._retained)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def lookup(self, block_hash: bytes) -> KVBlock | None:
        return self._cached.get(block_hash)

    def allocate(self, count: int) -> list[KVBlock]:
        """Take `count` blocks, evicting cached contents LRU, ordinary queue first; the
        caller checks num_free first."""
        if count > self.num_free:
            raise RuntimeError(f"asked for {count} blocks, {self.num_free} free")
        taken = []
        for _ in range(count):
            queue = self._free if self._free else self._retained
            _, block = queue.popitem(last=False)
            if block.block_hash is not None:
                if self._cached.get(block.block_hash) is block:
                    del self._cached[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            block.retained = False
            taken.append(block)
        return taken

    def touch(self, blocks: list[KVBlock]) -> None:
        """Share cached blocks with one more request, reviving them from either free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                if self._free.pop(block.block_id, None) is None:
                    del self._retained[block.block_id]
                block.retained = False
            block.ref_cnt += 1

    def release(self, blocks: list[KVBlock], retain: bool = False) -> None:
        """Drop one reference each; pass tail-first so the tail is evicted before the head.
        `retain`: the releasing sequence asked for its blocks to outlive ordinary ones."""
        for block in blocks:
            block.ref_cnt -= 1
            if block.ref_cnt < 0:
                raise RuntimeError(f"block {block.block_id} released twice")
            block.retained = block.retained or retain
            if block.ref_cnt == 0:
                queue = self._retained if block.retained else self._free
                queue[block.block_id] = block

    def register(self, block: KVBlock, block_hash: bytes) -> None:
        """Publish a full block under its chained hash; the first writer wins."""
        if block.block_hash is not None:
            return
        block.block_hash = block_hash
        self._cached.setdefault(block_hash, block)
