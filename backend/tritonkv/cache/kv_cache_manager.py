"""Per-instance view of the pool: each sequence's block table and its prefix-cache chain.

Rules:
- Block tables are append-only while a sequence lives; ``release`` drops them whole.
- Only full blocks whose KV has been written are registered in the prefix index
  (``commit``), so a shared block is never written again.
- A prefix hit never covers a prompt's last token: at least one token is computed, because
  its logits are needed.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from tritonkv.cache.block_hash import NO_HASH, hash_full_blocks
from tritonkv.cache.block_pool import BlockPool, PoolExhausted


@dataclass
class SequenceBlocks:
    extra_keys: tuple
    blocks: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)  # hashes of blocks[:len(hashes)], registered


class KVCacheManager:
    def __init__(self, pool: BlockPool, owner: int, enable_prefix_caching: bool = True):
        self.pool = pool
        self.owner = owner
        self.block_size = pool.block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._seqs: dict[Hashable, SequenceBlocks] = {}

    def __contains__(self, seq_id) -> bool:
        return seq_id in self._seqs

    def block_table(self, seq_id) -> list[int]:
        return self._seqs[seq_id].blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def start(self, seq_id, token_ids: Sequence[int], extra_keys: tuple = ()) -> int:
        """Open ``seq_id`` and attach the longest cached prefix of ``token_ids``.
        Returns how many tokens that prefix covers (their KV need not be computed)."""
        if seq_id in self._seqs:
            raise KeyError(f"sequence {seq_id!r} already holds KV blocks")
        seq = SequenceBlocks(extra_keys=tuple(extra_keys))
        self._seqs[seq_id] = seq
        if not self.enable_prefix_caching:
            return 0
        cacheable = token_ids[: max(len(token_ids) - 1, 0)]
        hashes = hash_full_blocks(cacheable, self.block_size, seq.extra_keys)
        seq.blocks = self.pool.acquire_cached_prefix(hashes, cacheable, self.owner)
        seq.hashes = hashes[: len(seq.blocks)]
        return len(seq.blocks) * self.block_size

    def grow(self, seq_id, num_tokens: int) -> bool:
        """Make the table cover ``num_tokens`` tokens. False (nothing changed) if the pool
        cannot supply the blocks."""
        seq = self._seqs[seq_id]
        missing = self.blocks_needed(num_tokens) - len(seq.blocks)
        if missing <= 0:
            return True
        try:
            seq.blocks.extend(self.pool.allocate(missing, self.owner))
        except PoolExhausted:
            return False
        return True

    def commit(self, seq_id, token_ids: Sequence[int]) -> None:
        """``token_ids`` have their KV written: enter newly full blocks into the prefix index."""
        if not self.enable_prefix_caching:
            return
        seq = self._seqs[seq_id]
        start = len(seq.hashes)
        parent = seq.hashes[-1] if seq.hashes else NO_HASH
        new = hash_full_blocks(token_ids, self.block_size, seq.extra_keys, start, parent)
        for i, h in enumerate(new, start):
            self.pool.register(seq.blocks[i], h, parent, token_ids[i * self.block_size:(i + 1) * self.block_size])
            parent = h
        seq.hashes.extend(new)

    def release(self, seq_id) -> None:
        """Drop the sequence; its registered blocks stay in the prefix index until evicted."""
        seq = self._seqs.pop(seq_id, None)
        if seq is not None:
            self.pool.release(seq.blocks, self.owner)

    def live_sequences(self) -> list:
        return list(self._seqs)
