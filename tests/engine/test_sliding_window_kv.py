"""Sliding-window models return the blocks no future query sees: per-sequence memory
O(window), greedy tokens equal HF transformers' (eager attention masks the same window,
keys in ``(p - w, p]``), across chunked prefill, multi-turn continuation, preemption and
prefix-cache hits."""

import pytest

from bounded_models import (assert_hf_greedy, build_checkpoint, prompt, run_tracking_blocks,  # noqa: F401
                            single_thread)
from engine_helpers import make_engine, run_conversations, run_turn

WINDOW = 24
BS = 4


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("mistral_w24"))
    hf = build_checkpoint(path, "MistralForCausalLM", seed=3, sliding_window=WINDOW, max_position_embeddings=4096)
    return path, hf


def test_2000_tokens_equal_hf_and_hold_window_blocks(mistral):
    path, hf = mistral
    engine = make_engine(path, block_size=BS, num_blocks=16)  # the pool holds 64 tokens
    ids = prompt(10, 0)
    c, most, _ = run_tracking_blocks(engine, "s", ids, 2000)
    assert len(c.token_ids) == 2000 and c.final.finish_reason == "length"
    assert_hf_greedy(hf, ids, c.token_ids)
    assert most <= -(-WINDOW // BS) + 2
    stats = engine.stats()
    # every block but the ones held at the end went back while the sequence ran
    assert stats["evicted_blocks_window"] >= -(-2010 // BS) - most
    assert stats["evicted_blocks_streaming"] == stats["evicted_blocks_h2o"] == 0
    assert stats["used"] == 0 and stats["preemptions"] == 0


def test_long_chunked_prefill_holds_o_window(mistral):
    path, hf = mistral
    engine = make_engine(path, block_size=BS, num_blocks=32, max_num_batched_tokens=64)
    ids = prompt(300, 1)
    c, most, _ = run_tracking_blocks(engine, "p", ids, 30)
    assert_hf_greedy(hf, ids, c.token_ids)
    # a chunk holds at most max(window, block) tokens beside the window
    assert most <= engine.policy.blocks_per_sequence(64) == (WINDOW + WINDOW) // BS + 2


def test_multi_turn_prefix_hit_and_preemption_equal_full_recompute(mistral):
    path, hf = mistral
    engine = make_engine(path, block_size=BS, num_blocks=64)
    history = []
    for i, new in enumerate([prompt(40, 2), prompt(30, 3)[1:], prompt(5, 4)[1:]]):
        c = run_turn(engine, "m", new, 50, start=i == 0, end=i == 2)
        assert_hf_greedy(hf, history + new, c.token_ids)
        if i:  # the live sequence continues from its kept window: only the new tokens are computed
            assert c.final.cached_tokens == len(history) - 1
        history += new + c.token_ids
    assert engine.pool.counts()["used"] == 0
    # a new conversation with the same opening attaches the cached blocks, then returns those
    # outside its window at once
    first = prompt(40, 2)
    c = run_turn(engine, "again", first, 10, start=True, end=True)
    assert c.final.cached_tokens == 36
    assert_hf_greedy(hf, first, c.token_ids)

    # 4 conversations, a pool for about 2 windows each: preempted ones recompute the same tokens
    small = make_engine(path, block_size=BS, num_blocks=20, max_num_batched_tokens=32)
    prompts = [prompt(30, 10 + i) for i in range(4)]
    cs = run_conversations(small, prompts, 60)
    assert small.scheduler.num_preemptions > 0
    for p, c in zip(prompts, cs):
        assert_hf_greedy(hf, p, c.token_ids)
    assert small.pool.counts()["used"] == 0
