"""Exact plans from the scheduler alone (no engine, no torch): the shared token budget, the
``max_num_seqs`` cap, chunked prefill order, prefix-cache hits and preemption victims.

Each test builds ``Sequence`` objects by hand and plays the engine's part between steps
(``advance``): computed chunks are committed to the prefix index, sampling chunks append one
token. Pools are small (4-token blocks) so that every block id can be spelled out.
"""

from __future__ import annotations

import pytest

from tritonkv.cache.block_pool import BlockPool
from tritonkv.cache.kv_cache_manager import KVCacheManager
from tritonkv.engine.requests import SamplingParams, Turn
from tritonkv.sched.scheduler import Scheduler
from tritonkv.sched.sequence import Sequence, SeqStatus

BS = 4
SAMPLED = 999  # the token the fake model "samples"


def make_scheduler(num_blocks: int, max_num_batched_tokens: int, max_num_seqs: int = 8,
                   prefix_caching: bool = True) -> tuple[BlockPool, KVCacheManager, Scheduler]:
    pool = BlockPool.in_process(num_blocks, BS)
    kv = KVCacheManager(pool, owner=0, enable_prefix_caching=prefix_caching)
    return pool, kv, Scheduler(kv, max_num_batched_tokens, max_num_seqs)


def running(seq_id, prompt, admitted_at: int, last_active: float = 0.0) -> Sequence:
    """A sequence whose first turn has just been admitted (what ``Engine._admit`` leaves)."""
    turn = Turn(prompt_ids=list(prompt), params=SamplingParams(max_tokens=64), emit=lambda out: None)
    return Sequence(seq_id, token_ids=list(prompt), status=SeqStatus.RUNNING, turn=turn,
                    admitted_at=admitted_at, last_active=last_active)


def prompt(first: int, n: int) -> list[int]:
    return list(range(first, first + n))


def shape(plan) -> list[tuple]:
    return [(c.seq.seq_id, c.start, c.num_tokens, c.sample) for c in plan]


def advance(kv: KVCacheManager, plan) -> None:
    """The engine's part of a step after the forward pass."""
    for c in plan:
        assert c.start == c.seq.num_computed
        c.seq.num_computed += c.num_tokens
        kv.commit(c.seq.seq_id, c.seq.token_ids[: c.seq.num_computed])
    for c in plan:
        if c.sample:
            c.seq.token_ids.append(SAMPLED)


def step(sched: Scheduler, run: list[Sequence], idle: list[Sequence] = ()) -> list[tuple]:
    plan = sched.schedule(list(run), list(idle))
    advance(sched.kv, plan)
    return shape(plan)


def finish(kv: KVCacheManager, seq: Sequence) -> None:
    """The turn ended with ``end_sequence``: the engine releases the KV."""
    seq.status = SeqStatus.ENDED
    kv.release(seq.seq_id)


def go_idle(seq: Sequence, last_active: float) -> None:
    """The turn ended; the conversation keeps its KV blocks."""
    seq.status = SeqStatus.IDLE
    seq.turn = None
    seq.last_active = last_active


def held(pool: BlockPool) -> tuple[int, int, int]:
    c = pool.counts()
    return c["used"], c["cached"], c["free"]


def assert_no_block_lost(pool: BlockPool, kv: KVCacheManager) -> None:
    """Every used block is in some live block table, none twice unless shared by a prefix hit."""
    tables = [kv.block_table(s) for s in kv.live_sequences()]
    in_tables = {b for t in tables for b in t}
    assert pool.counts()["used"] == len(in_tables)
    for t in tables:
        assert len(set(t)) == len(t)


# -- token budget ------------------------------------------------------------------------------

def test_decode_tokens_and_prefill_chunks_share_one_budget():
    pool, kv, sched = make_scheduler(num_blocks=32, max_num_batched_tokens=8)
    a = running("a", prompt(100, 3), admitted_at=0)
    assert step(sched, [a]) == [("a", 0, 3, True)]
    b = running("b", prompt(200, 10), admitted_at=1)
    # a decodes one token; b gets the remaining 7 of the 8-token budget, no sample yet
    assert step(sched, [a, b]) == [("a", 3, 1, True), ("b", 0, 7, False)]
    assert step(sched, [a, b]) == [("a", 4, 1, True), ("b", 7, 3, True)]
    assert step(sched, [a, b]) == [("a", 5, 1, True), ("b", 10, 1, True)]
    assert (a.num_computed, len(a.token_ids), b.num_computed, len(b.token_ids)) == (6, 7, 11, 12)
    # blocks are taken as each sequence's tokens cross a block boundary, interleaved
    assert kv.block_table("a") == [0, 3]
    assert kv.block_table("b") == [1, 2, 4]
    assert sched.num_preemptions == 0


def test_a_budget_spent_by_older_sequences_leaves_later_ones_unstarted():
    pool, kv, sched = make_scheduler(num_blocks=32, max_num_batched_tokens=5)
    a = running("a", prompt(100, 5), admitted_at=0)
    b = running("b", prompt(200, 2), admitted_at=1)
    assert step(sched, [a, b]) == [("a", 0, 5, True)]
    # b never reached: no KV opened for it, nothing allocated
    assert "b" not in kv
    assert (b.num_computed, b.turn.cached_tokens) == (0, -1)
    assert held(pool) == (2, 0, 30)
    assert step(sched, [a, b]) == [("a", 5, 1, True), ("b", 0, 2, True)]


def test_max_num_seqs_caps_the_batch_oldest_first():
    pool, kv, sched = make_scheduler(num_blocks=32, max_num_batched_tokens=100, max_num_seqs=2)
    a = running("a", prompt(100, 2), admitted_at=0)
    b = running("b", prompt(200, 2), admitted_at=1)
    c = running("c", prompt(300, 2), admitted_at=2)
    assert step(sched, [c, b, a]) == [("a", 0, 2, True), ("b", 0, 2, True)]
    assert "c" not in kv
    assert step(sched, [c, b, a]) == [("a", 2, 1, True), ("b", 2, 1, True)]
    assert "c" not in kv
    finish(kv, a)
    assert step(sched, [c, b]) == [("b", 3, 1, True), ("c", 0, 2, True)]


def test_sequences_that_are_not_running_are_skipped():
    pool, kv, sched = make_scheduler(num_blocks=32, max_num_batched_tokens=100, max_num_seqs=1)
    a = running("a", prompt(100, 2), admitted_at=0)
    b = running("b", prompt(200, 2), admitted_at=1)
    a.status = SeqStatus.ENDED
    # an ended sequence neither takes a slot of max_num_seqs nor opens KV
    assert step(sched, [a, b]) == [("b", 0, 2, True)]
    assert "a" not in kv


# -- chunked prefill ---------------------------------------------------------------------------

def test_long_prompt_is_prefilled_in_chunks_oldest_turn_first():
    pool, kv, sched = make_scheduler(num_blocks=32, max_num_batched_tokens=6)
    a = running("a", prompt(100, 14), admitted_at=0)
    b = running("b", prompt(200, 5), admitted_at=1)
    # the caller's list order does not matter: admitted_at does
    assert step(sched, [b, a]) == [("a", 0, 6, False)]
    assert "b" not in kv
    assert kv.block_table("a") == [0, 1]
    assert step(sched, [b, a]) == [("a", 6, 6, False)]
    assert kv.block_table("a") == [0, 1, 2]
    # a's last chunk reaches its last prompt token: it samples; b starts with what is left
    assert step(sched, [b, a]) == [("a", 12, 2, True), ("b", 0, 4, False)]
    assert kv.block_table("a") == [0, 1, 2, 3]
    assert kv.block_table("b") == [4]
    assert step(sched, [b, a]) == [("a", 14, 1, True), ("b", 4, 1, True)]
    assert (len(a.token_ids), len(b.token_ids)) == (16, 6)
    assert kv.block_table("b") == [4, 5]


def test_a_later_turn_of_a_conversation_prefills_only_its_new_tokens():
    pool, kv, sched = make_scheduler(num_blocks=32, max_num_batched_tokens=4)
    a = running("a", prompt(100, 3), admitted_at=0)
    assert step(sched, [a]) == [("a", 0, 3, True)]
    go_idle(a, last_active=1.0)
    # turn 2 arrives: 6 new prompt tokens after the 4 the conversation holds
    a.token_ids.extend(prompt(500, 6))
    a.status, a.admitted_at = SeqStatus.RUNNING, 5
    a.turn = Turn(prompt_ids=prompt(500, 6), params=SamplingParams(max_tokens=8), emit=lambda out: None,
                  cached_tokens=3)
    assert step(sched, [a]) == [("a", 3, 4, False)]
    assert step(sched, [a]) == [("a", 7, 3, True)]
    assert kv.block_table("a") == [0, 1, 2]
    assert a.turn.cached_tokens == 3


# -- prefix cache ------------------------------------------------------------------------------

def test_prefix_hit_sets_num_computed_and_cached_tokens():
    pool, kv, sched = make_scheduler(num_blocks=16, max_num_batched_tokens=32)
    a = running("a", prompt(100, 10), admitted_at=0)
    assert step(sched, [a]) == [("a", 0, 10, True)]
    assert kv.block_table("a") == [0, 1, 2]
    assert a.turn.cached_tokens == 0
    finish(kv, a)
    # blocks 0 and 1 were full and committed: cached; block 2 (2 tokens) is free again
    assert held(pool) == (0, 2, 14)

    b = running("b", prompt(100, 8) + [900, 901, 902], admitted_at=1)
    assert step(sched, [b]) == [("b", 8, 3, True)]
    assert b.turn.cached_tokens == 8
    assert kv.block_table("b") == [0, 1, 2]
    assert held(pool) == (3, 0, 13)


def test_prefix_hit_never_covers_the_last_prompt_token():
    pool, kv, sched = make_scheduler(num_blocks=16, max_num_batched_tokens=32)
    a = running("a", prompt(100, 8), admitted_at=0)
    assert step(sched, [a]) == [("a", 0, 8, True)]
    finish(kv, a)
    # the same 8 tokens again: block 1 holds the last prompt token, whose logits are needed
    b = running("b", prompt(100, 8), admitted_at=1)
    assert step(sched, [b]) == [("b", 4, 4, True)]
    assert (b.num_computed, b.turn.cached_tokens) == (8, 4)
    assert kv.block_table("b") == [0, 2]


def test_no_prefix_hit_when_prefix_caching_is_off():
    pool, kv, sched = make_scheduler(num_blocks=16, max_num_batched_tokens=32, prefix_caching=False)
    a = running("a", prompt(100, 10), admitted_at=0)
    assert step(sched, [a]) == [("a", 0, 10, True)]
    finish(kv, a)
    assert held(pool) == (0, 0, 16)
    b = running("b", prompt(100, 10), admitted_at=1)
    assert step(sched, [b]) == [("b", 0, 10, True)]
    assert b.turn.cached_tokens == 0


def test_prefix_hit_counts_toward_the_chunk_budget_only_for_new_tokens():
    pool, kv, sched = make_scheduler(num_blocks=16, max_num_batched_tokens=4)
    a = running("a", prompt(100, 13), admitted_at=0)
    for _ in range(4):
        step(sched, [a])
    assert (a.num_computed, len(a.token_ids)) == (13, 14)
    finish(kv, a)
    b = running("b", prompt(100, 12) + [900, 901, 902], admitted_at=1)
    # 12 tokens cached (3 full blocks); 3 new ones fit the 4-token budget in one chunk
    assert step(sched, [b]) == [("b", 12, 3, True)]
    assert b.turn.cached_tokens == 12


# -- preemption --------------------------------------------------------------------------------

def test_idle_conversations_are_preempted_first_least_recently_active():
    pool, kv, sched = make_scheduler(num_blocks=8, max_num_batched_tokens=32)
    i1 = running("i1", prompt(100, 8), admitted_at=0)
    i2 = running("i2", prompt(200, 8), admitted_at=1)
    i3 = running("i3", prompt(300, 3), admitted_at=2)
    assert step(sched, [i1, i2, i3]) == [("i1", 0, 8, True), ("i2", 0, 8, True), ("i3", 0, 3, True)]
    assert (kv.block_table("i1"), kv.block_table("i2"), kv.block_table("i3")) == ([0, 1], [2, 3], [4])
    go_idle(i1, last_active=5.0)
    go_idle(i2, last_active=3.0)
    go_idle(i3, last_active=1.0)
    finish(kv, i3)  # ended: no longer holds KV, so it is never a victim even though oldest
    start = held(pool)
    assert start == (4, 0, 4)

    # a running decoder ...
    d = running("d", prompt(400, 3), admitted_at=3)
    # ... and a 20-token prompt needing 5 blocks: 4 free, so one idle conversation must go
    r = running("r", prompt(500, 20), admitted_at=4)
    assert step(sched, [d, r], [i1, i2, i3]) == [("d", 0, 3, True), ("r", 0, 20, True)]
    assert sched.num_preemptions == 1
    assert kv.preempted_blocks == 2  # i2's two blocks (Engine.stats()["preempted_blocks"])
    assert "i2" not in kv and "i1" in kv
    assert (i1.num_computed, i2.num_computed) == (8, 0)
    # i2's tokens stay; only its KV went (its full blocks were cached, then reused)
    assert len(i2.token_ids) == 9
    assert kv.block_table("d") == [4]
    assert kv.block_table("r") == [5, 6, 7, 3, 2]
    assert held(pool) == (8, 0, 0)
    assert_no_block_lost(pool, kv)

    for s in (i1, d, r):
        finish(kv, s)
    used, cached, free = held(pool)
    assert used == 0 and cached + free == pool.counts()["total"] == 8


def test_running_victim_is_the_sequence_whose_turn_started_last():
    pool, kv, sched = make_scheduler(num_blocks=4, max_num_batched_tokens=32)
    a = running("a", prompt(100, 4), admitted_at=0)
    b = running("b", prompt(200, 4), admitted_at=2)
    c = running("c", prompt(300, 4), admitted_at=1)
    lonely = Sequence("lonely", token_ids=prompt(400, 4), status=SeqStatus.IDLE, last_active=0.0)
    assert step(sched, [a, b, c], [lonely]) == [("a", 0, 4, True), ("c", 0, 4, True), ("b", 0, 4, True)]
    assert (kv.block_table("a"), kv.block_table("c"), kv.block_table("b")) == ([0], [1], [2])
    assert held(pool) == (3, 0, 1)

    # every sequence now needs a second block; a takes the last free one, c must preempt:
    # the idle conversation holds no KV, so the victim is b (turn started last, step 2)
    plan = sched.schedule([a, b, c], [lonely])
    assert shape(plan) == [("a", 4, 1, True), ("c", 4, 1, True)]
    assert sched.num_preemptions == 1
    assert b.num_computed == 0
    assert len(b.token_ids) == 5  # tokens kept: b recomputes them later
    # b's only full block was evicted to make room for c, so b's restart found no prefix
    # and could not grow: it is open but holds nothing
    assert (kv.block_table("a"), kv.block_table("c"), kv.block_table("b")) == ([0, 3], [1, 2], [])
    assert b.turn.cached_tokens == 0
    assert_no_block_lost(pool, kv)
    advance(kv, plan)

    finish(kv, a)
    finish(kv, c)
    # b recomputes its whole context (4 prompt tokens + the one it had sampled)
    assert step(sched, [b]) == [("b", 0, 5, True)]
    assert kv.block_table("b") == [2, 3]  # free blocks first; a's and c's full blocks stay cached
    assert b.turn.cached_tokens == 0
    finish(kv, b)
    used, cached, free = held(pool)
    assert used == 0 and cached + free == 4


def test_preempted_sequence_reuses_its_own_cached_blocks_on_restart():
    pool, kv, sched = make_scheduler(num_blocks=6, max_num_batched_tokens=32)
    a = running("a", prompt(100, 8), admitted_at=0)
    b = running("b", prompt(200, 9), admitted_at=1)
    assert step(sched, [a, b]) == [("a", 0, 8, True), ("b", 0, 9, True)]
    assert (kv.block_table("a"), kv.block_table("b")) == ([0, 1], [2, 3, 4])
    assert b.turn.cached_tokens == 0
    # 7 more tokens for a (16 in all): a needs 2 more blocks, only block 5 is free, so b goes
    a.token_ids.extend(prompt(600, 7))
    assert step(sched, [a, b]) == [("a", 8, 8, True)]
    assert sched.num_preemptions == 1
    # b's two full blocks (2, 3) stayed cached; block 4 was never full, so it was freed and
    # a took it before evicting anything
    assert kv.block_table("a") == [0, 1, 4, 5]
    # later in the same step b (still RUNNING) reopened its KV on its own cached blocks:
    # 8 of its 10 tokens need no recompute; its third block found no room, so it waits
    assert kv.block_table("b") == [2, 3]
    assert b.num_computed == 8
    assert held(pool) == (6, 0, 0)
    finish(kv, a)
    assert step(sched, [b]) == [("b", 8, 2, True)]
    assert b.num_computed == 10
    # the third block evicts the least recently used cached one: a's last block (5)
    assert kv.block_table("b") == [2, 3, 5]
    # the turn reports the prefix hit of its first start, not the restart's
    assert b.turn.cached_tokens == 0
    assert sched.num_preemptions == 1
    finish(kv, b)
    used, cached, free = held(pool)
    assert used == 0 and cached + free == 6


def test_a_chunk_that_cannot_get_blocks_is_skipped_not_failed():
    pool, kv, sched = make_scheduler(num_blocks=2, max_num_batched_tokens=32)
    a = running("a", prompt(100, 7), admitted_at=0)
    b = running("b", prompt(200, 4), admitted_at=1)
    # a takes both blocks; b has no victim (a is in the plan) and waits with no blocks
    assert step(sched, [a, b]) == [("a", 0, 7, True)]
    assert "b" in kv and kv.block_table("b") == []
    assert sched.num_preemptions == 0
    assert held(pool) == (2, 0, 0)
    finish(kv, a)
    assert step(sched, [b]) == [("b", 0, 4, True)]


def test_no_kv_block_is_lost_over_many_steps_with_preemption():
    """Four sequences decoding 6 tokens each through a 6-block pool: preemptions happen, and
    at every step the used blocks are exactly those in live block tables."""
    pool, kv, sched = make_scheduler(num_blocks=6, max_num_batched_tokens=8, max_num_seqs=3)
    seqs = [running(i, prompt(100 * (i + 1), 5 + 3 * i), admitted_at=i) for i in range(4)]
    assert held(pool) == (0, 0, 6)
    for _ in range(40):
        live = [s for s in seqs if s.status is SeqStatus.RUNNING]
        if not live:
            break
        plan = sched.schedule(live, [])
        assert_no_block_lost(pool, kv)
        assert sum(c.num_tokens for c in plan) <= 8
        assert len(plan) <= 3
        advance(kv, plan)
        for s in live:
            if len(s.token_ids) - len(s.turn.prompt_ids) == 6:
                finish(kv, s)
    assert all(s.status is SeqStatus.ENDED for s in seqs)
    assert kv.live_sequences() == []
    # not exact: the victim fault below makes it 8 (2 without it)
    assert sched.num_preemptions >= 2
    assert held(pool) == (0, 5, 1)


# -- victim choice faults found by these tests (fixed) ------------------------------------------

def test_a_younger_sequence_never_preempts_an_older_running_one():
    pool, kv, sched = make_scheduler(num_blocks=4, max_num_batched_tokens=11, max_num_seqs=2)
    a = running("a", prompt(100, 10), admitted_at=0)
    b = running("b", prompt(200, 11), admitted_at=1)
    c = running("c", prompt(300, 2), admitted_at=2)
    assert step(sched, [a, b, c]) == [("a", 0, 10, True), ("b", 0, 1, False)]
    assert (kv.block_table("a"), kv.block_table("b")) == ([0, 1, 2], [3])
    # b's next chunk (10 tokens) needs 2 more blocks, none is free, and no sequence younger
    # than b holds any: b waits. c (younger still) must wait too, not take b's block.
    plan = sched.schedule([a, b, c], [])
    assert sched.num_preemptions == 0
    assert (b.num_computed, kv.block_table("b")) == (1, [3])
    assert shape(plan) == [("a", 10, 1, True)]


def test_a_sequence_holding_no_blocks_is_not_counted_as_preempted():
    pool, kv, sched = make_scheduler(num_blocks=6, max_num_batched_tokens=15)
    a = running("a", prompt(100, 17), admitted_at=0)
    b = running("b", prompt(200, 19), admitted_at=1)
    c = running("c", prompt(300, 6), admitted_at=2)
    assert step(sched, [a, b, c]) == [("a", 0, 15, False)]
    # a takes a fifth block (1 left); b needs 4 and has no victim, so it is open with none;
    # c needs 2: the only other holder, b, holds nothing, so there is nothing to preempt
    assert step(sched, [a, b, c]) == [("a", 15, 2, True)]
    assert sched.num_preemptions == 0
    assert kv.block_table("b") == []
