"""``Scheduler.plan_continuation``: the decode step launched while the step in flight is not
read back yet (overlap). Every block decision is the scheduler's: the plan it returns holds
one token per sequence at the position after its chunk, with that position's block grown;
None (launch nothing, read back first) at a turn's last token, at the context limit, when a
block could only be had by preemption, and when an h2o choice by mass is pending."""

from __future__ import annotations

from tritonkv.engine.requests import SamplingParams, Turn
from tritonkv.sched.scheduler import ScheduledChunk
from tritonkv.sched.sequence import Sequence, SeqStatus

from test_scheduler import held, make_scheduler, prompt, shape, step


def decoding(seq_id, n_prompt: int, max_tokens: int = 64, sampled: int = 0) -> Sequence:
    turn = Turn(prompt_ids=prompt(10, n_prompt), params=SamplingParams(max_tokens=max_tokens), emit=lambda o: None)
    turn.output_ids = [999] * sampled
    return Sequence(seq_id, token_ids=prompt(10, n_prompt), status=SeqStatus.RUNNING, turn=turn, admitted_at=seq_id)


def in_flight(sched, seqs):
    """Run the prefill step, then return the decode plan that is 'in flight' (not advanced)."""
    step(sched, seqs)
    return sched.schedule(seqs, [])


def test_continues_each_sequence_one_position_on_with_its_block_grown():
    pool, kv, sched = make_scheduler(num_blocks=8, max_num_batched_tokens=64)
    a, b = decoding(1, 4), decoding(2, 7)
    plan = in_flight(sched, [a, b])
    assert shape(plan) == [(1, 4, 1, True), (2, 7, 1, True)]
    # prefill: a [0], b [1, 2]; the step in flight: a's position 4 took block 3
    assert (kv.block_table(1), kv.block_table(2)) == ([0, 3], [1, 2])
    nxt = sched.plan_continuation(plan, context_limit=None)
    assert shape(nxt) == [(1, 5, 1, True), (2, 8, 1, True)]
    # b's position 8 starts a third block: grown now, by the scheduler; a's 5 fits its second
    assert (kv.block_table(1), kv.block_table(2)) == ([0, 3], [1, 2, 4])
    assert held(pool)[0] == 5


def test_last_token_of_a_turn_is_read_back_first():
    _, _, sched = make_scheduler(num_blocks=8, max_num_batched_tokens=64)
    # one token read back, the 2nd in flight: with max_tokens 2 that one is the last
    a = decoding(1, 4, max_tokens=2, sampled=1)
    plan = in_flight(sched, [a])
    assert sched.plan_continuation(plan, context_limit=None) is None
    b = decoding(2, 4, max_tokens=3, sampled=1)  # the 3rd may still be launched
    _, _, sched = make_scheduler(num_blocks=8, max_num_batched_tokens=64)
    assert shape(sched.plan_continuation(in_flight(sched, [b]), context_limit=None)) == [(2, 5, 1, True)]


def test_context_limit_is_read_back_first():
    _, _, sched = make_scheduler(num_blocks=8, max_num_batched_tokens=64)
    plan = in_flight(sched, [decoding(1, 4)])  # the token in flight goes to position 5
    assert sched.plan_continuation(plan, context_limit=6) is None
    assert shape(sched.plan_continuation(plan, context_limit=7)) == [(1, 5, 1, True)]


def test_never_preempts_for_a_continuation():
    pool, kv, sched = make_scheduler(num_blocks=2, max_num_batched_tokens=64)
    a = decoding(1, 7)  # 7 prompt tokens + the first sampled: 2 blocks, the pool is full
    plan = in_flight(sched, [a])
    assert held(pool)[0] == 2
    assert sched.plan_continuation(plan, context_limit=None) is None  # position 8 needs a third block
    assert sched.num_preemptions == 0 and len(kv.block_table(1)) == 2


def test_pending_h2o_choice_is_read_back_first():
    _, kv, sched = make_scheduler(num_blocks=8, max_num_batched_tokens=64)
    plan = [ScheduledChunk(decoding(1, 4), 4, 1, True)]
    kv.needs_decision = lambda seq_id, position: position == 5  # (the mass of query 4 decides)
    kv.start(1, plan[0].seq.token_ids)
    assert kv.grow(1, 5)
    assert sched.plan_continuation(plan, context_limit=None) is None
