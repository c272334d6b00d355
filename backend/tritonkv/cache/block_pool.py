"""The pool of KV blocks: refcounts, owner-tagged references, prefix index, LRU reclaim.

Words: a cached block is *reclaimed* when the pool hands it out again (its prefix entry
dropped); *eviction* is the bounded-KV policies' word (cache/eviction/) for blocks a live
sequence returns.

The metadata lives in flat numpy arrays (``PoolArrays``: the allocator's scans run over them
whole), plus ``_by_hash``, a dict from block hash to the blocks registered under it (a prefix
lookup reads it instead of scanning every block); the pool is its only writer, and every
public method runs under ``self.lock``.

Block states (derived from the arrays, never stored twice):
- free:    refcount 0, no hash          -> handed out first
- cached:  refcount 0, hash set         -> still in the prefix index; reclaimed LRU when no block is free
- used:    refcount > 0                 -> referenced by at least one live sequence

Rules:
- ``refcount[b] == owner_refs[:, b].sum()``: every reference is tagged with the owner (a
  process slot) that took it, so a dead owner's references can be dropped wholesale.
- A hash hit counts only if the stored tokens and parent hash equal the query's.
- ``_free_heap`` (a heap of block ids, each at most once: ``_queued``) holds every free block,
  and maybe blocks that stopped being free: ``allocate`` pops the lowest ids and skips those
  (a block is pushed again when ``release`` / ``release_owner`` frees it).
- ``_by_hash[h]`` lists exactly the blocks whose ``block_hash`` is ``h`` (h != NO_HASH), in
  ascending id order: when two blocks hold the same prefix, a hit takes the lower one.
- Reclaim order: least recently used first (``last_used``: a pool-wide tick, bumped when a
  block is taken or released), ties broken by lower block id.
"""

from __future__ import annotations

import bisect
import heapq
import threading
from dataclasses import dataclass

import numpy as np

from tritonkv.cache.block_hash import NO_HASH

STAT_NAMES = ("prefix_query_blocks", "prefix_hit_blocks", "reclaimed", "tick")
_STAT = {name: i for i, name in enumerate(STAT_NAMES)}


@dataclass
class PoolArrays:
    """The pool's whole state. Shapes: refcount/block_hash/parent_hash/last_used [num_blocks],
    block_tokens [num_blocks, block_size], owner_refs [max_owners, num_blocks], stats [4]."""

    refcount: np.ndarray
    owner_refs: np.ndarray
    block_hash: np.ndarray
    parent_hash: np.ndarray
    block_tokens: np.ndarray
    last_used: np.ndarray
    stats: np.ndarray

    @staticmethod
    def layout(num_blocks: int, block_size: int, max_owners: int) -> dict:
        """name -> (shape, dtype); the order is the order in a shared buffer."""
        return {
            "refcount": ((num_blocks,), np.int32),
            "owner_refs": ((max_owners, num_blocks), np.int32),
            "block_hash": ((num_blocks,), np.int64),
            "parent_hash": ((num_blocks,), np.int64),
            "block_tokens": ((num_blocks, block_size), np.int32),
            "last_used": ((num_blocks,), np.int64),
            "stats": ((len(STAT_NAMES),), np.int64),
        }

    @classmethod
    def allocate(cls, num_blocks: int, block_size: int, max_owners: int) -> "PoolArrays":
        return cls(**{name: np.zeros(shape, dtype) for name, (shape, dtype)
                      in cls.layout(num_blocks, block_size, max_owners).items()})


class PoolExhausted(Exception):
    """Not enough free or reclaimable blocks; the caller queues or preempts."""


class BlockPool:
    def __init__(self, arrays: PoolArrays, lock=None):
        self.arrays = arrays
        self.num_blocks, self.block_size = arrays.block_tokens.shape
        self.lock = lock if lock is not None else threading.RLock()
        self._by_hash: dict[int, list[int]] = {}
        free = (arrays.refcount == 0) & (arrays.block_hash == NO_HASH)
        self._free_heap: list[int] = np.flatnonzero(free).tolist()  # ascending: already a heap
        self._queued: set[int] = set(self._free_heap)
        # called with the cached blocks ``allocate`` reclaims, before their hashes are cleared
        self.on_reclaim = None

    @classmethod
    def in_process(cls, num_blocks: int, block_size: int, max_owners: int = 4) -> "BlockPool":
        return cls(PoolArrays.allocate(num_blocks, block_size, max_owners))

    # -- queries ---------------------------------------------------------------------------
    def _add_stat(self, name: str, n: int = 1) -> int:
        """Add ``n`` to the counter ``name`` (one of ``STAT_NAMES``); returns its new value."""
        self.arrays.stats[_STAT[name]] += n
        return int(self.arrays.stats[_STAT[name]])

    def _tick(self) -> int:
        return self._add_stat("tick")

    def counts(self) -> dict[str, int]:
        with self.lock:
            unused = self.arrays.refcount == 0
            cached = int((unused & (self.arrays.block_hash != NO_HASH)).sum())
            used = int((~unused).sum())
            stats = {name: int(v) for name, v in zip(STAT_NAMES, self.arrays.stats)}
            return {"total": self.num_blocks, "used": used, "cached": cached,
                    "free": self.num_blocks - used - cached, **stats}

    # -- references ------------------------------------------------------------------------
    def allocate(self, n: int, owner: int) -> list[int]:
        """``n`` blocks, free ones first (lowest id), then reclaiming cached ones LRU-first."""
        with self.lock:
            free = self._pop_free(n)
            if len(free) >= n:
                chosen = np.asarray(free, dtype=np.int64)
            else:
                cached = np.flatnonzero((self.arrays.refcount == 0) & (self.arrays.block_hash != NO_HASH))
                if len(free) + len(cached) < n:
                    self._push_free(free)
                    raise PoolExhausted(f"need {n} KV blocks, {len(free) + len(cached)} available")
                order = np.lexsort((cached, self.arrays.last_used[cached]))
                victims = cached[order[: n - len(free)]]
                if self.on_reclaim is not None:  # (the host tier keeps a copy: cache/tier_moves.py)
                    try:
                        self.on_reclaim([int(b) for b in victims])
                    except BaseException:
                        self._push_free(free)  # nothing changed: the free blocks stay free
                        raise
                for b in victims.tolist():
                    self._unindex(b)
                self.arrays.block_hash[victims] = NO_HASH
                self.arrays.parent_hash[victims] = NO_HASH
                self._add_stat("reclaimed", len(victims))
                chosen = np.concatenate([np.asarray(free, dtype=np.int64), victims])
            self._take(chosen, owner, distinct=True)
            return chosen.tolist()

    def _pop_free(self, n: int) -> list[int]:
        """Up to ``n`` free blocks, lowest ids first, out of the heap."""
        heap, refcount, block_hash = self._free_heap, self.arrays.refcount, self.arrays.block_hash
        out = []
        while heap and len(out) < n:
            b = heapq.heappop(heap)
            self._queued.discard(b)
            if refcount[b] == 0 and block_hash[b] == NO_HASH:
                out.append(b)
        return out

    def _push_free(self, blocks) -> None:
        """Queue those of ``blocks`` that are free now (each at most once)."""
        ids = np.asarray(blocks, dtype=np.int64)
        for b in ids[(self.arrays.refcount[ids] == 0) & (self.arrays.block_hash[ids] == NO_HASH)].tolist():
            if b not in self._queued:
                self._queued.add(b)
                heapq.heappush(self._free_heap, b)

    def _take(self, blocks: np.ndarray, owner: int, distinct: bool = False, stamp: bool = True) -> None:
        """One reference per listed block (``distinct``: no id twice, so plain indexing adds);
        ``stamp``: mark them used now (the LRU order of cached blocks)."""
        if distinct:
            self.arrays.refcount[blocks] += 1
            self.arrays.owner_refs[owner][blocks] += 1
        else:
            np.add.at(self.arrays.refcount, blocks, 1)
            np.add.at(self.arrays.owner_refs[owner], blocks, 1)
        if stamp:
            self.arrays.last_used[blocks] = self._tick()

    def take_ref(self, blocks: list[int], owner: int) -> None:
        with self.lock:
            self._take(np.asarray(blocks, dtype=np.int64), owner)

    def release(self, blocks: list[int], owner: int) -> None:
        """Drop one reference per listed block; hashed blocks stay cached, others become free."""
        self._drop(blocks, owner, stamp=True)

    def drop_refs(self, blocks: list[int], owner: int) -> None:
        """Undo an unstamped ``acquire_cached_prefix``: one reference per listed block dropped,
        their LRU stamps untouched, so the pool is as it was before the acquire."""
        self._drop(blocks, owner, stamp=False)

    def _drop(self, blocks: list[int], owner: int, stamp: bool) -> None:
        if not blocks:
            return
        with self.lock:
            idx = np.asarray(blocks, dtype=np.int64)
            if (self.arrays.owner_refs[owner][idx] <= 0).any():
                raise ValueError(f"owner {owner} releases blocks it does not hold: {blocks}")
            np.subtract.at(self.arrays.refcount, idx, 1)
            np.subtract.at(self.arrays.owner_refs[owner], idx, 1)
            if stamp:
                # Released last block of a chain is reclaimed before its parents (LRU by tick order).
                tick = self._tick()
                self.arrays.last_used[idx] = tick + np.arange(len(idx))[::-1]
                self._add_stat("tick", len(idx))
            self._push_free(idx)

    def release_owner(self, owner: int) -> int:
        """Drop every reference ``owner`` holds (its process died). Returns how many."""
        with self.lock:
            refs = self.arrays.owner_refs[owner].copy()
            self.arrays.refcount -= refs
            self.arrays.owner_refs[owner] = 0
            self._push_free(np.flatnonzero(refs))
            return int(refs.sum())

    def num_available(self) -> int:
        """Blocks ``allocate`` can hand out now (free + cached)."""
        with self.lock:
            return int((self.arrays.refcount == 0).sum())

    def refcounts(self, blocks: list[int]) -> list[int]:
        with self.lock:
            return self.arrays.refcount[np.asarray(blocks, dtype=np.int64)].tolist()

    # -- prefix index ----------------------------------------------------------------------
    def register(self, block: int, block_hash: int, parent_hash: int, tokens) -> None:
        """Enter a full, written block into the prefix index."""
        with self.lock:
            self._unindex(block)
            self.arrays.block_hash[block] = block_hash
            self.arrays.parent_hash[block] = parent_hash
            self.arrays.block_tokens[block] = tokens
            bisect.insort(self._by_hash.setdefault(int(block_hash), []), int(block))  # find: lowest id first

    def _unindex(self, block: int) -> None:
        """Take ``block`` out of ``_by_hash`` (it is about to lose or change its hash)."""
        h = int(self.arrays.block_hash[block])
        if h == NO_HASH:
            return
        blocks = self._by_hash[h]
        blocks.remove(block)
        if not blocks:
            del self._by_hash[h]

    def find(self, block_hash: int, parent_hash: int, tokens) -> int | None:
        """A block holding exactly these tokens after this parent, or None."""
        with self.lock:
            candidates = self._by_hash.get(int(block_hash))
            if not candidates:  # (most lookups: a miss costs no token conversion)
                return None
            tokens = [int(t) for t in tokens]
            for b in candidates:
                if self.arrays.parent_hash[b] == parent_hash and self.arrays.block_tokens[b].tolist() == tokens:
                    return int(b)
            return None

    def acquire_cached_prefix(self, hashes: list[int], token_ids, owner: int, swap_in: bool = False) -> list[int]:
        """Longest run of cached blocks matching ``hashes`` (block i = tokens of block i), with
        one reference taken on each, atomically (no reclaim can slip in between). ``swap_in``:
        a parked sequence taking its own blocks back, no prompt lookup: not counted in the
        prefix-cache stats, and not stamped, so ``drop_refs`` undoes it exactly."""
        with self.lock:
            blocks, parent = [], NO_HASH
            bs = self.block_size
            for i, h in enumerate(hashes):
                b = self.find(h, parent, token_ids[i * bs:(i + 1) * bs])
                if b is None:
                    break
                blocks.append(b)
                parent = h
            if not swap_in:
                self._add_stat("prefix_query_blocks", len(hashes))
                self._add_stat("prefix_hit_blocks", len(blocks))
            if blocks:
                self._take(np.asarray(blocks, dtype=np.int64), owner, distinct=True, stamp=not swap_in)
            return blocks

