"""Per-instance view of the pool: each sequence's block table and its prefix-cache chain.

Rules:
- A block table lists the sequence's *kept* blocks in order; ``origins`` holds each one's
  original block number (token ``p`` of the text lives in original block ``p // block_size``).
  Without eviction the two are the same and tables are append-only. With an eviction policy
  (cache/eviction/) ``evict`` reshifts blocks no future query keeps; their tokens are
  ``evicted_tokens``, so a new token at text position ``p`` lands at *cache index*
  ``p - evicted_tokens`` and the kernels see a dense cache.
- Keys are stored rotated (RoPE) at ``cache index + angle_shift``; a query is rotated the same
  way. Window models keep the text positions (``angle_shift`` = ``evicted_tokens``, holes only
  at the front). Streaming / h2o use positions inside the cache: when blocks in the middle go,
  the kept blocks before the hole are re-rotated forward by the evicted token count
  (``take_kv_ops``: the engine applies them on the device before the next launch), so every
  distance a query sees is its distance inside the cache; ``angle_shift`` is brought back to 0
  (all kept keys rotated back) before angles would leave the rotary table.
- A written block is never changed in place by eviction: the first time a block must be re-rotated,
  the sequence keeps it as the *source* and re-rotates a copy; every later re-rotation recomputes the
  copy from the source with the total angle, so a sink re-rotated a thousand times has one
  rounding (bf16 would drift otherwise), and a source that sits in the prefix index stays
  valid for other sequences. Only the rebase re-rotates blocks in place, and only private ones
  never re-rotated before (recent-window blocks: each is rebased at most a couple of times in its
  life). A sequence registers no block past its policy's ``cacheable_blocks``.
- ``fork`` gives samples of one prompt (engine/sample_group.py) the parent's whole blocks, one
  more pool reference per sample, never a copy: the parent's table then ends on a block
  boundary before the prompt's last token, so no shared block is written again (each sample
  writes the rest of the prompt into blocks of its own). Policies that evict never fork (their
  tables are not plain prefixes).
- Only full blocks whose KV has been written are registered in the prefix index
  (``commit``), so a shared block is never written again.
- A prefix hit never covers a prompt's last token: at least one token is computed, because
  its logits are needed.
- A policy that ``needs_attention_mass`` (h2o): ``add_mass`` accumulates each kept block's
  attention mass; the decisions taken and the mass survive preemption (``preempt``), so a recompute evicts the same blocks at the same
  positions.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

from tritonkv.cache.block_hash import NO_HASH, hash_full_blocks
from tritonkv.cache.block_pool import BlockPool, PoolExhausted
from tritonkv.cache.eviction.choose import EVICTING_POLICIES
from tritonkv.cache.eviction.none import NoEviction
from tritonkv.cache.eviction.policy import EvictionPolicy
from tritonkv.cache.host_tier import HostTier
from tritonkv.cache.tier_moves import SwapPlan, TierMoves


@dataclass
class SequenceBlocks:
    extra_keys: tuple
    blocks: list[int] = field(default_factory=list)
    origins: list[int] = field(default_factory=list)  # original block number of each kept block
    hashes: list[int] = field(default_factory=list)  # hashes of original blocks [0, len), registered
    evicted_tokens: int = 0
    angle_shift: int = 0
    sources: list[int] = field(default_factory=list)  # per kept block: its written original (-1: none)
    rerotated: list[int] = field(default_factory=list)  # per kept block: positions re-rotated from the original
    mass: np.ndarray = field(default_factory=lambda: np.zeros(0))  # h2o: per kept block


@dataclass
class EvictionHistory:
    """What a preempted h2o sequence needs to evict the same blocks when it is recomputed."""

    evicted_at: dict[int, int] = field(default_factory=dict)  # original block -> query position
    last: int = -1  # the latest position in evicted_at (kept here: every decode step asks)
    mass: dict[int, float] = field(default_factory=dict)  # original block -> mass


@dataclass
class KVOp:
    """A device-side change of cached KV the engine applies before the next launch (every
    layer): ``rerotated_copy``: block ``dst[i]`` = block ``src[i]`` with its keys re-rotated by ``delta``
    positions (values copied); ``rotate``: the keys in ``slots`` re-rotate by ``delta`` in place."""

    kind: str
    src: list[int] = field(default_factory=list)
    dst: list[int] = field(default_factory=list)
    slots: np.ndarray | None = None
    delta: int = 0


class KVCacheManager(TierMoves):
    def __init__(self, pool: BlockPool, owner: int, enable_prefix_caching: bool = True,
                 policy: EvictionPolicy | None = None, angle_limit: int = 1 << 62,
                 host: HostTier | None = None, disk: HostTier | None = None):
        """``angle_limit``: rotary angles (positions) must stay below it (the rotary table).
        ``host``: the host tier idle sequences swap to (cache/tier_moves.py)."""
        self.pool = pool
        self.owner = owner
        self.block_size = pool.block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.policy = policy or NoEviction(pool.block_size)
        self.angle_limit = angle_limit
        # the most tokens a table holds (cache indices, so angles, stay below it + angle_shift)
        self._cache_bound = (self.policy.kept_blocks() * self.block_size if self.policy.positions_in_cache
                             else 0)
        self._seqs: dict[Hashable, SequenceBlocks] = {}
        self._history: dict[Hashable, EvictionHistory] = {}
        self._ops: list[KVOp] = []
        self.host = host
        self.disk = disk  # conversations the host tier drops spill here (cache/tier_moves.py)
        if host is not None and enable_prefix_caching:
            pool.on_reclaim = self._demote
        self._swaps = SwapPlan()
        self._parked_now: set = set()
        self._demoted_now: set = set()  # host blocks demoted since the last take_swaps
        self._restoring: set = set()  # swapped in, copies maybe in flight (cache/tier_moves.py)
        self._history_type = EvictionHistory
        self.evicted_blocks = dict.fromkeys(EVICTING_POLICIES, 0)  # per policy name
        self.preempted_blocks = 0  # pool blocks held by sequences when they were preempted
        self.forked_blocks = 0  # block references samples took from their parent (``fork``)

    def __contains__(self, seq_id) -> bool:
        return seq_id in self._seqs

    def block_table(self, seq_id) -> list[int]:
        return self._seqs[seq_id].blocks

    def origins(self, seq_id) -> list[int]:
        return self._seqs[seq_id].origins

    def cache_index(self, seq_id, position: int) -> int:
        """Where the token at text ``position`` (not yet evicted) sits in the cache."""
        return position - self._seqs[seq_id].evicted_tokens

    def angle_shift(self, seq_id) -> int:
        return self._seqs[seq_id].angle_shift

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def max_chunk(self, position: int) -> int:
        return self.policy.max_chunk(position)

    def start(self, seq_id, token_ids: Sequence[int], extra_keys: tuple = ()) -> int:
        """Open ``seq_id`` and attach the longest cached prefix of ``token_ids``.
        Reshifts how many tokens that prefix covers (their KV need not be computed)."""
        if seq_id in self._seqs:
            raise KeyError(f"sequence {seq_id!r} already holds KV blocks")
        seq = SequenceBlocks(extra_keys=tuple(extra_keys))
        self._seqs[seq_id] = seq
        if not self.enable_prefix_caching:
            return 0
        cacheable = token_ids[: max(len(token_ids) - 1, 0)]
        hashes = hash_full_blocks(cacheable, self.block_size, seq.extra_keys)[: self.policy.cacheable_blocks()]
        blocks = self.pool.acquire_cached_prefix(hashes, cacheable, self.owner)
        blocks += self._host_prefix(hashes, cacheable, len(blocks))
        self._append(seq_id, seq, blocks)
        seq.hashes = hashes[: len(blocks)]
        return len(blocks) * self.block_size

    def fork(self, parent_id, child_ids: list, num_tokens: int) -> None:
        """Open each of ``child_ids`` holding the parent's first ``num_tokens`` tokens (whole
        blocks: the parent's table covers exactly them) by reference."""
        parent = self._seqs[parent_id]
        if num_tokens % self.block_size or self.blocks_needed(num_tokens) != len(parent.blocks):
            raise ValueError(f"fork at {num_tokens} tokens: the parent holds {len(parent.blocks)} blocks "
                             f"of {self.block_size}; a fork shares whole blocks only")
        if self.policy.evicts or parent.evicted_tokens:
            raise ValueError(f"the {self.policy.name} eviction policy does not fork sequences")
        taken = [c for c in child_ids if c in self._seqs]
        if taken:
            raise KeyError(f"sequence {taken[0]!r} already holds KV blocks")
        if parent.blocks:
            self.pool.take_ref(parent.blocks * len(child_ids), self.owner)  # one reference per child
        for child_id in child_ids:  # (no eviction: a fresh table of the same blocks, as start() opens one)
            child = self._seqs[child_id] = SequenceBlocks(parent.extra_keys)
            self._append(child_id, child, list(parent.blocks))
            child.hashes = list(parent.hashes)
        self.forked_blocks += len(parent.blocks) * len(child_ids)

    def _append(self, seq_id, seq: SequenceBlocks, blocks: list[int]) -> None:
        first = seq.origins[-1] + 1 if seq.origins else seq.evicted_tokens // self.block_size
        origins = list(range(first, first + len(blocks)))
        seq.blocks.extend(blocks)
        seq.origins.extend(origins)
        seq.sources.extend([-1] * len(blocks))
        seq.rerotated.extend([0] * len(blocks))
        if self.policy.needs_attention_mass:
            past = self._history.get(seq_id)
            init = [past.mass.get(o, 0.0) for o in origins] if past else [0.0] * len(origins)
            seq.mass = np.concatenate([seq.mass, np.asarray(init, dtype=np.float64)])

    def grow(self, seq_id, num_tokens: int) -> bool:
        """Make the table cover the text's first ``num_tokens`` tokens (evicted ones
        excepted). False (nothing changed) if the pool cannot supply the blocks."""
        seq = self._seqs[seq_id]
        missing = self.blocks_needed(num_tokens - seq.evicted_tokens) - len(seq.blocks)
        if missing <= 0:
            return True
        try:
            blocks = self.pool.allocate(missing, self.owner)
        except PoolExhausted:
            return False
        self._append(seq_id, seq, blocks)
        return True

    def commit(self, seq_id, token_ids: Sequence[int], num_tokens: int | None = None) -> None:
        """The first ``num_tokens`` of ``token_ids`` (default: all) have their KV written: enter
        newly full blocks into the prefix index."""
        if not self.enable_prefix_caching:
            return
        seq = self._seqs[seq_id]
        if self.policy.positions_in_cache and seq.evicted_tokens:
            return  # KV past the first eviction depends on the policy, and sinks get rotated
        start = len(seq.hashes)
        parent = seq.hashes[-1] if seq.hashes else NO_HASH
        written = len(token_ids) if num_tokens is None else min(num_tokens, len(token_ids))
        limit = min(written // self.block_size, self.policy.cacheable_blocks())
        if start >= limit:
            return
        new = hash_full_blocks(token_ids[: limit * self.block_size], self.block_size, seq.extra_keys, start, parent)
        first = seq.origins[0] if seq.origins else 0
        for i, h in enumerate(new, start):
            if first <= i < first + len(seq.blocks):  # (a window model may have returned it)
                self.pool.register(seq.blocks[i - first], h, parent,
                                   token_ids[i * self.block_size:(i + 1) * self.block_size])
            parent = h
        seq.hashes.extend(new)

    # -- eviction ----------------------------------------------------------------------------
    def needs_decision(self, seq_id, position: int) -> bool:
        """The query at ``position`` would evict by attention mass (the engine must have read
        back the mass of every earlier query first)."""
        if not self.policy.needs_attention_mass:
            return False
        seq = self._seqs[seq_id]
        return bool(self.policy.victims(seq.origins, position, seq.mass))

    def would_evict(self, seq_id, position: int) -> bool:
        return self.policy.evicts and bool(self._victims(seq_id, self._seqs[seq_id], position))

    def held_blocks(self, seq_id) -> int:
        """Pool blocks the sequence holds: its table plus the originals of re-rotated blocks."""
        seq = self._seqs[seq_id]
        return len(seq.blocks) + sum(s >= 0 for s in seq.sources)

    def evict(self, seq_id, position: int) -> bool:
        """Return the blocks that the query at text ``position`` and every later one no longer
        keep, and queue the key rotations this needs (``take_kv_ops``). False (nothing
        changed) if the pool cannot supply the re-rotated copies (the caller preempts or waits)."""
        if not self.policy.evicts:
            return True
        seq = self._seqs[seq_id]
        victims = self._victims(seq_id, seq, position)
        gone = set(victims)
        bs = self.block_size
        shifts: dict[int, int] = {}  # table index (before dropping) -> positions to re-rotate by
        if self.policy.positions_in_cache and victims:
            after = 0
            for i in range(len(seq.blocks) - 1, -1, -1):
                if i in gone:
                    after += bs
                elif after:
                    shifts[i] = after
        shift = seq.angle_shift + len(victims) * bs
        rebase = bool(self.policy.positions_in_cache and shift and shift + self._cache_bound >= self.angle_limit)
        if not victims and not rebase:
            return True
        if seq_id in self._restoring:  # its blocks may still be arriving: this step's compute
            self._swaps.wait_restores = True  # (and the re-rotations) wait for them
        in_place = set()
        if rebase:
            for i in range(len(seq.blocks)):
                if i in gone:
                    continue
                if i not in shifts and seq.sources[i] < 0 and not self._indexed(seq, i):
                    in_place.add(i)
                shifts[i] = shifts.get(i, 0) - shift
        copies = sum(1 for i, d in shifts.items() if d and seq.sources[i] < 0 and i not in in_place)
        if copies and self.pool.num_available() + self._freed(seq, victims) < copies:
            return False
        remap = {old: new for new, old in enumerate(i for i in range(len(seq.blocks)) if i not in gone)}
        if victims:
            self._drop(seq_id, seq, victims, position)
        seq.angle_shift = 0 if rebase else shift
        self._rerotate(seq, {remap[i]: d for i, d in shifts.items()}, {remap[i] for i in in_place})
        return True

    def _indexed(self, seq: SequenceBlocks, i: int) -> bool:
        """The block at table index ``i`` may sit in the prefix index (others may read it)."""
        return seq.origins[i] < len(seq.hashes)

    @staticmethod
    def _blocks_at(seq: SequenceBlocks, victims: list[int]) -> list[int]:
        """The pool blocks the table entries ``victims`` hold: each block, then the written
        originals of turned ones."""
        return [seq.blocks[i] for i in victims] + [seq.sources[i] for i in victims if seq.sources[i] >= 0]

    def _freed(self, seq: SequenceBlocks, victims: list[int]) -> int:
        held = self._blocks_at(seq, victims)
        return sum(r == 1 for r in self.pool.refcounts(held)) if held else 0

    def _victims(self, seq_id, seq: SequenceBlocks, position: int) -> list[int]:
        past = self._history.get(seq_id)
        if past and position <= past.last:
            # a recompute after preemption: the decisions taken then, at the same positions
            return [i for i, o in enumerate(seq.origins) if past.evicted_at.get(o, 1 << 62) <= position]
        return self.policy.victims(seq.origins, position, seq.mass)

    def _drop(self, seq_id, seq: SequenceBlocks, victims: list[int], position: int) -> None:
        gone = set(victims)
        if self.policy.needs_attention_mass:
            past = self._history.setdefault(seq_id, EvictionHistory())
            for i in victims:
                past.evicted_at.setdefault(seq.origins[i], position)
            past.last = max(past.last, position)
        released = self._blocks_at(seq, victims)
        if seq_id in self._restoring:
            self._unqueue_restore(released)
        keep = [i for i in range(len(seq.blocks)) if i not in gone]
        seq.blocks = [seq.blocks[i] for i in keep]
        seq.origins = [seq.origins[i] for i in keep]
        seq.sources = [seq.sources[i] for i in keep]
        seq.rerotated = [seq.rerotated[i] for i in keep]
        if len(seq.mass):
            seq.mass = seq.mass[keep]
        self.pool.release(released, self.owner)
        self.evicted_blocks[self.policy.name] += len(victims)
        seq.evicted_tokens += len(victims) * self.block_size

    def _rerotate(self, seq: SequenceBlocks, shifts: dict[int, int], in_place: set[int]) -> None:
        """Re-rotate the keys of table blocks ``i`` by ``shifts[i]`` positions. A block re-rotated for the
        first time keeps its written original (a source, never changed: it may be shared) and
        gets a copy; later re-rotations recompute the copy from the original with the total angle, so
        rounding never compounds. ``in_place`` blocks (private, rebased only) re-rotate in place."""
        fresh = [i for i in shifts if seq.sources[i] < 0 and i not in in_place and shifts[i]]
        if fresh:
            copies = self.pool.allocate(len(fresh), self.owner)
            for i, b in zip(fresh, copies):
                seq.sources[i], seq.blocks[i] = seq.blocks[i], b
        by_delta: dict[int, list[int]] = {}
        for i, delta in shifts.items():
            if not delta:
                continue
            if i in in_place:
                self._rotate(seq, [i], delta)
                continue
            seq.rerotated[i] += delta
            by_delta.setdefault(seq.rerotated[i], []).append(i)
        for total, idx in by_delta.items():
            self._ops.append(KVOp("rerotated_copy", src=[seq.sources[i] for i in idx], dst=[seq.blocks[i] for i in idx],
                                  delta=total))

    def _rotate(self, seq: SequenceBlocks, indices, delta: int) -> None:
        blocks = np.asarray([seq.blocks[i] for i in indices], dtype=np.int64)
        if len(blocks) and delta:
            slots = (blocks[:, None] * self.block_size + np.arange(self.block_size)[None, :]).reshape(-1)
            self._ops.append(KVOp("rotate", slots=slots, delta=delta))

    def take_kv_ops(self) -> list[KVOp]:
        ops, self._ops = self._ops, []
        return ops

    def add_mass(self, seq_id, origins: Sequence[int], mass: np.ndarray) -> None:
        """h2o: add one query's attention mass; ``mass[i]`` belongs to original block
        ``origins[i]`` (the table at that query's launch)."""
        seq = self._seqs.get(seq_id)
        if seq is None or not len(seq.mass):
            return
        n = min(len(origins), len(seq.origins))
        if seq.origins[:n] == list(origins[:n]):
            seq.mass[:n] += mass[:n]
            return
        where = {o: i for i, o in enumerate(seq.origins)}
        for o, m in zip(origins, mass):
            if o in where:
                seq.mass[where[o]] += m

    # -- release -----------------------------------------------------------------------------
    def preempt(self, seq_id) -> None:
        """Drop the sequence's blocks but keep what a recompute needs to evict the same way."""
        seq = self._seqs.get(seq_id)
        if seq is not None and self.policy.needs_attention_mass:
            past = self._history.setdefault(seq_id, EvictionHistory())
            past.mass.update(zip(seq.origins, seq.mass.tolist()))
        if seq is not None:  # released, not necessarily freed (shared prefix blocks stay cached)
            self.preempted_blocks += self.held_blocks(seq_id)
        self._drop_all(seq_id)

    def release(self, seq_id) -> None:
        """Drop the sequence from both tiers; its registered blocks stay in the prefix index
        until reclaimed."""
        self._history.pop(seq_id, None)
        if self.host is not None:
            self.host.drop(seq_id)
        if self.disk is not None:
            self.disk.drop(seq_id)
        self._drop_all(seq_id)

    def _drop_all(self, seq_id) -> None:
        self._abandon_restore(seq_id)
        seq = self._seqs.pop(seq_id, None)
        if seq is not None:
            self.pool.release(seq.blocks + [b for b in seq.sources if b >= 0], self.owner)

    def live_sequences(self) -> list:
        return list(self._seqs)
