"""Which KV blocks each sequence owns, and the salted prefix-cache lookups.

Full blocks are identified by a hash chain that starts from the caller's salt (the tenant),
so two tenants never share a block and cannot probe each other's cached prompts by timing.
The root also names the LoRA adapter (`name@version`): the same tokens under another adapter,
or under a reloaded version of the same one, have different keys and values.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Collection

from models.block_pool import BlockPool, KVBlock
from models.request import Sequence


def root_hash(salt: str | None, adapter: str | None = None) -> bytes:
    """The chain's root for a tenant salt and an adapter key; JSON keeps the two apart, so
    no salt can be crafted to collide with another tenant's adapter."""
    return hashlib.sha256(b"tiered-prefix:" + json.dumps([salt, adapter]).encode()).digest()


def chain_hash(parent: bytes, token_ids: list[int]) -> bytes:
    return hashlib.sha256(parent + struct.pack(f"<{len(token_ids)}q", *token_ids)).digest()


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks)
        self._blocks: dict[str, list[KVBlock]] = {}
        self._hashes: dict[str, list[bytes]] = {}
        self.queries = 0
        self.hits = 0

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_used

    def blocks_of(self, seq: Sequence) -> list[KVBlock]:
        return self._blocks.get(seq.seq_id, [])

    def block_table(self, seq: Sequence) -> list[int]:
        return [b.block_id for b in self._blocks.get(seq.seq_id, [])]

    def find_cached_prefix(self, seq: Sequence) -> list[KVBlock]:
        """Longest run of cached full blocks, leaving at least one token to compute."""
        if not self.enable_caching:
            return []
        tokens = seq.all_token_ids
        usable = (len(tokens) - 1) // self.block_size
        found: list[KVBlock] = []
        parent = root_hash(seq.cache_salt, seq.lora_key)
        for i in range(usable):
            parent = chain_hash(parent, tokens[i * self.block_size : (i + 1) * self.block_size])
            block = self.pool.lookup(parent)
            if block is None:
                break
            found.append(block)
        return found

    def record_lookup(self, num_prompt_tokens: int, num_hit_tokens: int) -> None:
        self.queries += num_prompt_tokens
        self.hits += num_hit_tokens

    def allocate(
        self, seq: Sequence, num_new_tokens: int, cached: Collection[KVBlock] = ()
    ) -> bool:
        """Make room for `num_new_tokens` more tokens; False (and no change) if it can't."""
        owned = self._blocks.get(seq.seq_id, [])
        total = seq.num_computed_tokens + len(cached) * self.block_size + num_new_tokens
        needed = -(-total // self.block_size) - len(owned) - len(cached)
        revived = sum(1 for b in cached if b.ref_cnt == 0)
        if needed + revived > self.pool.num_free:
            return False
        if cached:
            self.pool.touch(list(cached))
            owned = owned + list(cached)
        if needed > 0:
            owned = owned + self.pool.allocate(needed)
        self._blocks[seq.seq_id] = owned
        return True

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Publish every block that is now full of computed tokens."""
        if not self.enable_caching:
            return
        hashes = self._hashes.setdefault(seq.seq_id, [])
        owned = self._blocks.get(seq.seq_id, [])
        full = min(seq.num_computed_tokens // self.block_size, len(owned))
        if len(hashes) >= full:
            return
        tokens = seq.all_token_ids
        parent = hashes[-1] if hashes else root_hash(seq.cache_salt, seq.lora_key)
        for i in range(len(hashes), full):
            parent = chain_hash(parent, tokens[i * self.block_size : (i + 1) * self.block_size])
            hashes.append(parent)
            self.pool.register(owned[i], parent)

    def free(self, seq: Sequence) -> None:
        """Return every block of a finished, aborted or preempted sequence; a retained
        sequence's blocks go to the pool's retained queue, evicted after ordinary ones."""
        owned = self._blocks.pop(seq.seq_id, [])
        self._hashes.pop(seq.seq_id, None)
        self.pool.release(list(reversed(owned)), retain=seq.retain)
