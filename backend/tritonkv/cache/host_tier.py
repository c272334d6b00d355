"""The host tier: KV blocks of idle conversations kept in host memory, keyed by sequence id.

Plain Python over integer block ids (the bytes live in ops/kv_swap.py's ``KVSwapper``).

Rules:
- A sequence is in exactly one tier: its device table (KVCacheManager) or here. ``park``
  stores the sequence's block metadata (a ``SequenceBlocks``) with one host block per device
  block it held, in the same order; ``unpark`` hands both back and frees the host blocks.
- Host blocks are handed out lowest id first, as one contiguous run when one exists (a
  swap of n blocks is then one host copy, not n).
- Every per-block operation (a demotion, a free) costs the same whatever the tier's size:
  the free count is kept, not counted, and one block is found by the first free id (a
  reclaim demotes hundreds of blocks within one step).
- When a new conversation needs room, the tier makes it by dropping whole conversations,
  least recently parked first (``make_room``): a dropped conversation recomputes its KV on
  its next turn, exactly as a preempted one.
- ``drop`` (END, cancel, idle timeout) frees a sequence's host blocks at once; nothing is
  copied.
- Prefix blocks: a cached block the device pool reclaims (its LRU) is demoted here
  (``demote``): it keeps its hash, parent hash and tokens, and a later prompt that misses
  on the device but finds it here (``find``, verified like a device hit) loads it instead
  of recomputing it. Cached host blocks are the first to go when room is needed (least
  recently used first), before any parked conversation; a demotion never drops a parked
  conversation.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np

STAT_NAMES = ("swap_out_blocks", "swap_in_blocks", "swap_in_device_hit_blocks", "swap_outs", "swap_ins",
              "dropped_blocks", "dropped", "demoted_blocks", "prefix_hit_blocks")


@dataclass
class Parked:
    state: object  # the sequence's SequenceBlocks (block ids in it are stale until unparked)
    host_blocks: list[int]


class HostTier:
    def __init__(self, num_blocks: int, block_bytes: int = 0):
        if num_blocks <= 0:
            raise ValueError(f"a host tier needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_bytes = block_bytes
        self._free = np.ones(num_blocks, dtype=bool)
        self._num_free = num_blocks  # == self._free.sum()
        self._parked: OrderedDict[Hashable, Parked] = OrderedDict()  # least recently parked first
        # demoted prefix blocks: host block -> (hash, parent hash, tokens), least recently used first
        self._cached: OrderedDict[int, tuple[int, int, tuple]] = OrderedDict()
        self._index: dict[int, list[int]] = {}  # block hash -> cached host blocks
        self.stats = {name: 0 for name in STAT_NAMES}

    def __contains__(self, seq_id) -> bool:
        return seq_id in self._parked

    def num_free(self) -> int:
        return self._num_free

    def blocks_of(self, seq_id) -> list[int]:
        return list(self._parked[seq_id].host_blocks)

    def parked(self) -> list:
        """Parked sequence ids, least recently parked first."""
        return list(self._parked)

    def counts(self) -> dict[str, int]:
        free, cached = self.num_free(), len(self._cached)
        return {"total": self.num_blocks, "used": self.num_blocks - free - cached, "cached": cached, "free": free,
                "sequences": len(self._parked), **self.stats}

    def _allocate(self, n: int) -> list[int]:
        if self._num_free < n:
            raise ValueError(f"host tier: need {n} blocks, {self._num_free} free")
        if n == 0:
            return []
        if n == 1:  # the lowest free id (argmax stops at the first True)
            b = int(self._free.argmax())
            self._free[b] = False
            self._num_free -= 1
            return [b]
        free = np.flatnonzero(self._free)
        # the first run of n consecutive free ids, else the lowest free ids
        runs = np.flatnonzero(free[n - 1:] - free[:len(free) - n + 1] == n - 1)
        chosen = free[runs[0]:runs[0] + n] if len(runs) else free[:n]
        self._free[chosen] = False
        self._num_free -= n
        return [int(b) for b in chosen]

    def _release(self, blocks: list[int]) -> None:
        """Free host blocks that were in use (each once)."""
        self._free[blocks] = True
        self._num_free += len(blocks)

    def make_room(self, n: int, keep=()) -> list | None:
        """Free cached prefix blocks, then drop least recently parked conversations (not in
        ``keep``), until ``n`` blocks are free. Returns (sequence id, state, blocks it held)
        of each dropped one (the caller spills it to disk or keeps what a recompute needs);
        None and nothing changed when even all that cannot free ``n``."""
        if n > self.num_blocks:
            return None
        reclaimable = self.num_free() + len(self._cached) + sum(
            len(p.host_blocks) for s, p in self._parked.items() if s not in keep)
        if reclaimable < n:
            return None
        self._evict_cached(n)
        dropped = []
        for seq_id in list(self._parked):
            if self.num_free() >= n:
                break
            if seq_id in keep:
                continue
            parked = self._parked[seq_id]
            self.stats["dropped_blocks"] += len(parked.host_blocks)
            self.stats["dropped"] += 1
            self.drop(seq_id)
            dropped.append((seq_id, parked.state, parked.host_blocks))
        return dropped

    def _evict_cached(self, n: int) -> None:
        """Free cached prefix blocks, least recently used first, until ``n`` are free (or none
        is left)."""
        while self.num_free() < n and self._cached:
            b, (h, _, _) = self._cached.popitem(last=False)
            self._index[h].remove(b)
            if not self._index[h]:
                del self._index[h]
            self._release([b])

    def find(self, block_hash: int, parent_hash: int, tokens: tuple) -> int | None:
        """A demoted block holding exactly these tokens after this parent (now most recently
        used), or None."""
        for b in self._index.get(block_hash, ()):
            _, parent, stored = self._cached[b]
            if parent == parent_hash and stored == tokens:
                self._cached.move_to_end(b)
                return b
        return None

    def demote(self, block_hash: int, parent_hash: int, tokens: tuple) -> int | None:
        """A host block for a prefix block the device reclaims; None when it is here already
        or only parked conversations could make room."""
        if self.find(block_hash, parent_hash, tokens) is not None:
            return None
        self._evict_cached(1)
        if not self.num_free():
            return None
        b = self._allocate(1)[0]
        self._cached[b] = (block_hash, parent_hash, tokens)
        self._index.setdefault(block_hash, []).append(b)
        self.stats["demoted_blocks"] += 1
        return b

    def park(self, seq_id, state, num_blocks: int) -> list[int]:
        """Give ``seq_id`` ``num_blocks`` host blocks (the caller made room) and keep ``state``."""
        if seq_id in self._parked:
            raise KeyError(f"sequence {seq_id!r} is already in the host tier")
        blocks = self._allocate(num_blocks)
        self._parked[seq_id] = Parked(state, blocks)
        self.stats["swap_out_blocks"] += num_blocks
        self.stats["swap_outs"] += 1
        return blocks

    def peek(self, seq_id) -> Parked:
        """``seq_id``'s parked state, left in place."""
        return self._parked[seq_id]

    def unpark(self, seq_id, still_on_device: int = 0) -> Parked:
        """Take ``seq_id`` out (its blocks are being copied back; the host blocks are free
        for later copies, which the copy stream orders after this one). The first
        ``still_on_device`` of its blocks are not copied: the device still caches them."""
        parked = self._parked.pop(seq_id)
        self._release(parked.host_blocks)
        self.stats["swap_in_blocks"] += len(parked.host_blocks) - still_on_device
        self.stats["swap_in_device_hit_blocks"] += still_on_device
        self.stats["swap_ins"] += 1
        return parked

    def drop(self, seq_id) -> bool:
        """Free ``seq_id``'s host blocks without copying anything back."""
        parked = self._parked.pop(seq_id, None)
        if parked is None:
            return False
        self._release(parked.host_blocks)
        return True


# -- sizing -------------------------------------------------------------------------------------
AUTO_RAM_FRACTION = 0.4  # of MemAvailable, shared by the host's GPUs
AUTO_POOL_MULTIPLE = 4  # auto never exceeds this many device pools


def available_ram_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def host_tier_bytes(kv_host_memory_gb: float, on_gpu: bool, num_gpus: int, device_pool_bytes: int,
                    available: int | None = None) -> int:
    """Bytes of the host tier. ``kv_host_memory_gb`` > 0: that many GiB; 0: none; < 0 (auto):
    on a GPU server ``AUTO_RAM_FRACTION`` of the available RAM split over its GPUs, at most
    ``AUTO_POOL_MULTIPLE`` device pools; on CPU none (the "device" pool is host memory already)."""
    if kv_host_memory_gb >= 0:
        return int(kv_host_memory_gb * 2**30)
    if not on_gpu:
        return 0
    ram = available_ram_bytes() if available is None else available
    return int(min(AUTO_RAM_FRACTION * ram / max(num_gpus, 1), AUTO_POOL_MULTIPLE * device_pool_bytes))


def describe_tier(name: str, num_blocks: int, block_bytes: int, block_size: int, context: int,
                  blocks_per_sequence: int, device_blocks: int) -> str:
    """One line: a tier's blocks and bytes, and how many idle conversations of ``context``
    tokens (``blocks_per_sequence`` blocks each, bounds applied) it holds beside the device
    pool's."""
    per = max(blocks_per_sequence, 1)
    return (f"{name}: {num_blocks:,} blocks ({num_blocks * block_bytes / 2**30:.2f} GiB, "
            f"{num_blocks * block_size:,} tokens) hold {num_blocks // per:,} idle conversations of "
            f"{context:,} tokens; the device pool {device_blocks // per:,}")
