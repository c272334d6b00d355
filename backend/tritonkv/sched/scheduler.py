"""Plans one engine step: which sequences run, and how many of their tokens.

Rules:
- One token budget per step (``max_num_batched_tokens``) shared by decode tokens and
  prefill chunks; no separate prefill/decode phases. A prompt longer than the remaining
  budget is prefilled in chunks over several steps.
- Running sequences are served oldest turn first; a sequence samples only when the chunk
  reaches its last token.
- When blocks run out, the scheduler preempts instead of failing: idle conversations first
  (least recently active), then the running sequence whose turn started last. Preemption
  drops the KV (full blocks stay in the prefix cache) and the sequence recomputes later.
- The scheduler never touches the free list: it asks the KV manager to ``grow``.
- With a host tier (cache/host_tier.py), an idle victim swaps out instead (its blocks move
  to host memory, its computed tokens stay computed); only when the host tier cannot take
  it is it preempted. A running sequence whose blocks sit in the host tier swaps in before
  anything else of its step (making room as for ``grow``) and then prefills only its new
  tokens. Running victims are always preempted (recomputed).
- A swap-in's copies overlap the other rows' compute: when a step plans other sequences too,
  the restored ones are taken out of it (their blocks stay allocated) and run from the first
  step after their copies landed (``kv.restoring``); a step of restored sequences alone runs
  them at once and waits for the copies (``kv.restore_now``). A sequence whose samples wait
  for its fork is never taken out.
- With an eviction policy (cache/eviction/) a sequence first returns the blocks its next
  chunk no longer sees (``evict``), and a chunk never crosses a position where the kept set
  changes (``max_chunk``). A preempted sequence keeps its eviction history (``preempt``).
- Samples of one prompt (sched/sequence.py): a sample waits while its parent computes; in the
  step whose plan brings the parent to ``fork_at`` (or once it is there) every waiting sample
  forks (``KVCacheManager.fork``: the parent's blocks, one more reference each) and plans its
  own rest of the prompt in the same step (the parent's KV is written before any attention
  of the step reads it, layer by layer). A parent's chunks never sample.
"""

from __future__ import annotations

from dataclasses import dataclass

from tritonkv.cache.kv_cache_manager import KVCacheManager
from tritonkv.sched.sequence import Sequence, SeqStatus


@dataclass
class ScheduledChunk:
    seq: Sequence
    start: int  # first position computed in this step (== seq.num_computed)
    num_tokens: int
    sample: bool  # this chunk ends at the sequence's last token


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_batched_tokens: int, max_num_seqs: int):
        self.kv = kv
        self.budget = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.num_preemptions = 0
        self.num_swap_outs = 0  # idle sequences swapped out to the host tier

    def schedule(self, running: list[Sequence], idle: list[Sequence]) -> list[ScheduledChunk]:
        order = sorted(running, key=lambda s: s.admitted_at)
        planned: list[ScheduledChunk] = []
        budget = self.budget
        restored = set()  # swapped in this step (their copies are queued now)
        for seq in order:
            if budget == 0 or len(planned) == self.max_num_seqs:
                break
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted-and-reset sequences keep RUNNING; ended ones are skipped
            if seq.parent is not None:
                continue  # a sample whose parent has not reached its fork yet
            if self.kv.restoring(seq.seq_id):
                continue  # swapped in by an earlier step, its copies not landed yet
            if self.kv.swapped(seq.seq_id):
                if not self._make_room(seq, lambda: self.kv.swap_in(seq.seq_id, seq.token_ids), planned, order, idle):
                    continue
                if seq.turn is not None and seq.turn.cached_tokens < 0:
                    seq.turn.cached_tokens = seq.num_computed
                if self.kv.restoring(seq.seq_id) and not seq.samples:
                    restored.add(seq.seq_id)
            if seq.seq_id not in self.kv:
                cached = self.kv.start(seq.seq_id, seq.token_ids, seq.extra_keys)
                seq.num_computed = cached
                if seq.turn is not None and seq.turn.cached_tokens < 0:
                    seq.turn.cached_tokens = cached
            n = min(seq.num_uncomputed, budget, self.kv.max_chunk(seq.num_computed))
            if n <= 0:
                self._fork(seq)
                continue
            if not self._make_room(seq, lambda: self.kv.evict(seq.seq_id, seq.num_computed), planned, order, idle):
                continue
            if not self._make_room(seq, lambda: self.kv.grow(seq.seq_id, seq.num_computed + n), planned, order, idle):
                continue
            planned.append(ScheduledChunk(seq, seq.num_computed, n, seq.fork_at is None
                                          and seq.num_computed + n == len(seq.token_ids)))
            budget -= n
            if seq.fork_at is not None and seq.num_computed + n == seq.fork_at:
                self._fork(seq)
        return self._overlap_restores(planned, restored)

    def _overlap_restores(self, planned: list[ScheduledChunk], restored: set) -> list[ScheduledChunk]:
        """Take the sequences swapped in this step out of it when it computes others too; the
        step waits for the copies of the restoring sequences it keeps."""
        others = [c for c in planned if c.seq.seq_id not in restored]
        kept = others if restored and others else planned
        now = [c.seq.seq_id for c in kept if self.kv.restoring(c.seq.seq_id)]
        if now:
            self.kv.restore_now(now)
        return kept

    def _fork(self, parent: Sequence) -> None:
        """``parent``'s first ``fork_at`` tokens are computed (or planned in this step): its
        waiting samples take its blocks (the sample's prefix-cache count is the parent's)."""
        if parent.fork_at is None or not parent.samples:
            return
        samples = [s for s in parent.samples if s.status is SeqStatus.RUNNING]
        self.kv.fork(parent.seq_id, [s.seq_id for s in samples], parent.fork_at)
        for s in samples:
            s.parent = None
            s.num_computed = parent.fork_at
            if s.turn is not None and parent.turn is not None:
                s.turn.cached_tokens = parent.turn.cached_tokens
        parent.samples = []

    def plan_continuation(self, plan: list[ScheduledChunk], context_limit: int | None) -> list[ScheduledChunk] | None:
        """One decode token per sequence of ``plan`` (the step in flight) at the position after
        its chunk, with the blocks for it; None when that step may not be launched before
        ``plan``'s tokens are read back."""
        continued = []
        for chunk in plan:
            seq, turn = chunk.seq, chunk.seq.turn
            position = chunk.start + chunk.num_tokens  # where the token in flight goes
            if (len(turn.output_ids) + 1 >= turn.params.max_tokens
                    or (context_limit is not None and position + 1 >= context_limit)
                    or self.kv.needs_decision(seq.seq_id, position)):
                return None
            if not self.kv.evict(seq.seq_id, position) or not self.kv.grow(seq.seq_id, position + 1):
                return None
            continued.append(ScheduledChunk(seq, position, 1, True))
        return continued

    def _make_room(self, seq, attempt, planned, order, idle) -> bool:
        """Retry ``attempt`` (a KV manager call that needs blocks) after each preemption. (The
        set of planned ids is built only when a victim is needed: built on every call it made
        a step of n rows O(n^2).)"""
        busy = None
        while not attempt():
            if busy is None:
                busy = {c.seq.seq_id for c in planned} | {seq.seq_id}
            victim = self._pick_victim(seq, busy, order, idle)
            if victim is None:
                return False
            self.preempt(victim, keep=[s.seq_id for s in order])
        return True

    def _holds_blocks(self, seq: Sequence) -> bool:
        return seq.seq_id in self.kv and bool(self.kv.block_table(seq.seq_id))

    def _pick_victim(self, requester, busy, order, idle) -> Sequence | None:
        """Idle holders first (least recently active); then running sequences whose turn
        started after the requester's, youngest first. Never an older turn, never a sequence
        that holds no block (preempting it would free nothing)."""
        holders = [s for s in idle if self._holds_blocks(s)]
        if holders:
            return min(holders, key=lambda s: s.last_active)
        for s in reversed(order):
            if s is requester:
                return None
            if s.seq_id not in busy and self._holds_blocks(s):
                return s
        return None

    def preempt(self, seq: Sequence, keep=()) -> None:
        """Free ``seq``'s device blocks: an idle one swaps out when the host tier takes it
        (dropping parked sequences other than ``keep``, least recently parked first);
        otherwise its KV is dropped and recomputed later."""
        if seq.status is SeqStatus.IDLE and self.kv.swap_out(seq.seq_id, keep):
            self.num_swap_outs += 1
            return
        self.kv.preempt(seq.seq_id)
        seq.num_computed = 0
        self.num_preemptions += 1
