"""Moving a sequence's blocks between the device pool and the host tier (a KVCacheManager
mixin: the state is the manager's; cache/host_tier.py keeps the host side).

Rules:
- ``swap_out`` parks every block the sequence holds (its table, then the written originals
  of turned blocks, in that order) in the host tier and releases the device references at
  once: the copies are queued (``take_swaps``) and the engine runs them before anything
  else touches the device this step (ops/kv_swap.py orders device reads before writes and
  host reads before host writes), so a released block may be handed out in the same step.
  Registered blocks stay in the prefix index on the device until the pool reuses them.
- ``swap_in`` takes one fresh device block per parked block and restores the table with
  the new ids; the sequence's computed tokens, eviction state (origins, turns, h2o mass)
  and registered hashes are as they were, so its next turn prefills only its new tokens.
  Leading registered blocks the device pool still caches (nothing reclaimed them since the
  swap-out, or another sequence wrote the same prefix) are taken back by reference instead
  of copied (``_still_cached``; host tier only, a sequence no eviction policy has reshaped);
  a sequence all of whose blocks are still cached is not ``restoring`` at all.
- A conversation the host tier drops to make room keeps what a recompute needs (h2o mass),
  as a preempted one does.
- ``release`` frees every tier at once.
- Restores overlap other rows' compute: a host-tier swap-in's copies (``restore_host`` ->
  ``restore_device``) run on the copy stream, and the sequence is ``restoring`` until the
  engine reports them landed (``restores_landed``); the scheduler computes it from the first
  step after that, or in the step of its swap-in when nothing else runs then (``restore_now``:
  that step's compute waits for the copies). A restoring sequence whose blocks are released
  (cancel, end, preemption), or that an eviction policy trims or re-rotates before they
  landed, sets ``wait_restores``: the step's compute waits for the copies before anything
  can write those blocks again; if that happens in the step that queued the copies, the
  copies of the released blocks are dropped (``_unqueue_restore``), so a block handed on in
  the same step never receives a stale copy. Disk swap-ins and prefix loads from the host are
  waited in their own step.
- Disk tier (a HostTier of file-backed blocks): a conversation the host tier drops to make
  room is spilled there instead (``_spill``), and swaps in from there directly.
- Prefix blocks the device pool reclaims are demoted (``_demote``, the pool's ``on_reclaim``):
  their copy is queued like a swap-out, read before the reused block is written. A prompt
  whose prefix misses on the device continues its lookup in the host tier
  (``_host_prefix``): those blocks get fresh device blocks, are copied in before the step
  runs, and enter the device prefix index again. A block demoted in the same step is not
  such a hit (its bytes reach the host after the step's loads read it): the lookup stops
  there and the prompt computes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tritonkv.cache.block_hash import NO_HASH
from tritonkv.cache.block_pool import PoolExhausted


@dataclass
class SwapPlan:
    """The copies one step runs: device block ``out_device[i]`` -> host block ``out_host[i]``,
    host block ``in_host[i]`` -> device block ``in_device[i]`` (prefix loads: this step's
    compute reads them), host block ``restore_host[i]`` -> device block ``restore_device[i]``
    (swap-ins: waited only with ``wait_restores``, or once landed)."""

    out_device: list[int] = field(default_factory=list)
    out_host: list[int] = field(default_factory=list)
    in_host: list[int] = field(default_factory=list)
    in_device: list[int] = field(default_factory=list)
    spill_host: list[int] = field(default_factory=list)  # host block -> disk block spill_disk[i]
    spill_disk: list[int] = field(default_factory=list)
    in_disk: list[int] = field(default_factory=list)  # disk block -> device block in_disk_device[i]
    in_disk_device: list[int] = field(default_factory=list)
    restore_host: list[int] = field(default_factory=list)
    restore_device: list[int] = field(default_factory=list)
    wait_restores: bool = False  # this step's compute waits for every restore queued so far

    def copies_device(self) -> bool:
        """Reads or writes device blocks (the copy stream's part)."""
        return bool(self.out_device or self.in_host or self.in_disk or self.restore_host)

    def __bool__(self) -> bool:
        return self.copies_device() or bool(self.spill_host or self.wait_restores)


class TierMoves:
    """Needs ``self.host`` (a HostTier or None), ``self.disk``, ``self._seqs``, ``self.pool``,
    ``self.owner``, ``self._history``, ``self._swaps`` (a SwapPlan), ``self._parked_now``
    (sequences parked since the last ``take_swaps``), ``self._demoted_now`` (host blocks
    demoted since then) and ``self._restoring`` (a set)."""

    def restoring(self, seq_id) -> bool:
        """Swapped in from the host; its copies may not have landed yet."""
        return seq_id in self._restoring

    def restoring_any(self) -> bool:
        return bool(self._restoring)

    def restores_landed(self) -> None:
        """The engine saw every queued restore land: those sequences may be computed."""
        self._restoring.clear()

    def restore_now(self, seq_ids) -> None:
        """These sequences are computed in this step: its compute waits for the copies."""
        self._restoring.difference_update(seq_ids)
        self._swaps.wait_restores = True

    def _abandon_restore(self, seq_id) -> None:
        """A restoring sequence's blocks are released: nothing may write them before its
        copies land."""
        if seq_id in self._restoring:
            self._restoring.discard(seq_id)
            self._swaps.wait_restores = True
            seq = self._seqs.get(seq_id)
            if seq is not None:
                self._unqueue_restore(self._held(seq))

    def _unqueue_restore(self, device_blocks) -> None:
        """Restoring blocks released in the step that queued their copies: those copies are
        dropped (no one keeps the bytes, and another sequence may take the block in this
        step: a copy into it would land after that sequence's own)."""
        gone = set(device_blocks)
        pairs = [(h, d) for h, d in zip(self._swaps.restore_host, self._swaps.restore_device) if d not in gone]
        self._swaps.restore_host = [h for h, _ in pairs]
        self._swaps.restore_device = [d for _, d in pairs]

    def swapped(self, seq_id) -> bool:
        """The sequence's blocks sit in the host tier or on disk."""
        return (self.host is not None and seq_id in self.host) or (self.disk is not None and seq_id in self.disk)

    def _spill(self, seq_id, state, host_blocks: list[int]) -> None:
        """A conversation the host tier dropped goes to disk (dropping the least recently
        spilled there if needed), else it will recompute."""
        room = self.disk.make_room(len(host_blocks), keep={seq_id}) if self.disk is not None else None
        if room is None:
            self._remember_mass(seq_id, state)
            return
        for dropped_id, dropped_state, _ in room:
            self._remember_mass(dropped_id, dropped_state)
        self._swaps.spill_disk += self.disk.park(seq_id, state, len(host_blocks))
        self._swaps.spill_host += host_blocks

    def _held(self, seq) -> list[int]:
        return seq.blocks + [b for b in seq.sources if b >= 0]

    def swap_out(self, seq_id, keep=()) -> bool:
        """Park ``seq_id``'s blocks in the host tier, dropping least recently parked
        conversations (other than ``keep``) if it is full. False (nothing changed) when there
        is no host tier, it cannot hold them, or the sequence is restoring (the caller then
        preempts it)."""
        seq = self._seqs.get(seq_id)
        if self.host is None or seq is None or seq_id in self._restoring:
            return False  # (its bytes may not be on the device yet: the gather would read them first)
        held = self._held(seq)
        if self.host.num_free() < len(held):
            # (never a conversation parked in this step: its bytes are not on the host yet)
            dropped = self.host.make_room(len(held), keep=set(keep) | {seq_id} | self._parked_now)
            if dropped is None:
                return False
            for dropped_id, state, blocks in dropped:
                self._spill(dropped_id, state, blocks)
        self._swaps.out_host += self.host.park(seq_id, seq, len(held))
        self._parked_now.add(seq_id)
        self._swaps.out_device += held
        del self._seqs[seq_id]
        self.pool.release(held, self.owner)
        return True

    def swap_in(self, seq_id, token_ids=None) -> bool:
        """Bring ``seq_id`` back to the device. False (nothing changed) if the pool cannot
        supply its blocks now (the caller makes room or waits). With its ``token_ids``, the
        leading blocks the device still caches (``_still_cached``) are taken back, not copied."""
        tier = self.host if seq_id in self.host else self.disk
        reuse = self._still_cached(tier.peek(seq_id).state, token_ids) if tier is self.host else []
        try:
            device = self.pool.allocate(len(tier.blocks_of(seq_id)) - len(reuse), self.owner)
        except BaseException as exc:
            self.pool.drop_refs(reuse, self.owner)  # (nothing changed, the LRU order included)
            if isinstance(exc, PoolExhausted):
                return False
            raise
        parked = tier.unpark(seq_id, len(reuse))
        seq = parked.state
        fresh = iter(device)
        seq.blocks = reuse + [next(fresh) for _ in seq.blocks[len(reuse):]]
        seq.sources = [next(fresh) if b >= 0 else -1 for b in seq.sources]
        self._seqs[seq_id] = seq
        if tier is self.host:
            if device:
                self._swaps.restore_host += parked.host_blocks[len(reuse):]  # (host blocks: blocks, then sources)
                self._swaps.restore_device += device
                self._restoring.add(seq_id)
        else:
            self._swaps.in_disk += parked.host_blocks
            self._swaps.in_disk_device += device
        return True

    def _still_cached(self, state, token_ids) -> list[int]:
        """The device blocks (one reference taken on each) still caching the leading blocks of
        a parked sequence: its registered blocks, found in the device prefix index by hash,
        parent and tokens (the KV any sequence wrote for them). Only for a sequence that has
        evicted nothing (every eviction counts in ``evicted_tokens``): its kept blocks are then
        its original blocks from the first on, none turned or re-rotated; [] otherwise."""
        if token_ids is None or not self.enable_prefix_caching or not state.hashes or state.evicted_tokens:
            return []
        return self.pool.acquire_cached_prefix(state.hashes, token_ids, self.owner, swap_in=True)

    def _remember_mass(self, seq_id, seq) -> None:
        if self.policy.needs_attention_mass:
            past = self._history.setdefault(seq_id, self._history_type())
            past.mass.update(zip(seq.origins, seq.mass.tolist()))

    def take_swaps(self) -> SwapPlan:
        plan, self._swaps = self._swaps, SwapPlan()
        self._parked_now = set()
        self._demoted_now = set()
        return plan

    def tier_counts(self) -> dict[str, int]:
        """The host tier's blocks and counters (empty without one); the disk tier's as
        ``disk_*``."""
        counts = {} if self.host is None else self.host.counts()
        if self.disk is not None:
            counts.update({f"disk_{k}": v for k, v in self.disk.counts().items()})
        return counts

    def _demote(self, victims: list[int]) -> None:
        """The pool reclaims these cached blocks: keep a copy of each in the host tier."""
        a = self.pool.arrays
        for b in victims:
            host = self.host.demote(int(a.block_hash[b]), int(a.parent_hash[b]), tuple(a.block_tokens[b].tolist()))
            if host is not None:
                self._swaps.out_device.append(b)
                self._swaps.out_host.append(host)
                self._demoted_now.add(host)

    def _host_prefix(self, hashes: list[int], token_ids, start: int) -> list[int]:
        """Device blocks for the blocks ``start``.. of a prompt's prefix found in the host tier
        (loaded this step, entered in the device prefix index); [] if none or no room."""
        if self.host is None:
            return []
        bs, found = self.block_size, []
        parent = hashes[start - 1] if start else NO_HASH
        for i in range(start, len(hashes)):
            host = self.host.find(hashes[i], parent, tuple(int(t) for t in token_ids[i * bs:(i + 1) * bs]))
            if host is None or host in self._demoted_now:  # (its bytes are copied there after this step's loads)
                break
            found.append(host)
            parent = hashes[i]
        if not found:
            return []
        try:
            device = self.pool.allocate(len(found), self.owner)
        except PoolExhausted:
            return []
        for j, b in enumerate(device):
            i = start + j
            self.pool.register(b, hashes[i], hashes[i - 1] if i else NO_HASH, token_ids[i * bs:(i + 1) * bs])
        self._swaps.in_host += found
        self._swaps.in_device += device
        self.host.stats["prefix_hit_blocks"] += len(found)
        return device
