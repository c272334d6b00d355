"""HF transformers on the same weights is the oracle: greedy tokens equal, logits close (fp32)."""

import random

import pytest
import torch

from engine_helpers import TEST_DEVICE, engine_prefill_logits, make_engine, run_conversations, run_turn
from tiny_models import FAMILIES, build_tiny_checkpoint, hf_greedy


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(request.param))
    return request.param, path, build_tiny_checkpoint(request.param, path)


def prompt(n, seed):
    rng = random.Random(seed)
    return [1] + [rng.randrange(3, 96) for _ in range(n - 1)]


def test_prefill_logits_match_hf(family):
    _, path, hf = family
    engine = make_engine(path)
    ids = prompt(23, 0)
    ours = engine_prefill_logits(engine, ids)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    # fp32 everywhere; on CUDA another summation order (the kernels' fp32 dots are full fp32,
    # kernels/jit_helpers.mma): the CUDA bound is the tf32-era one until a GPU run measures it
    tol = dict(atol=2e-4, rtol=1e-4) if TEST_DEVICE == "cpu" else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(ours, ref, **tol)


def test_single_prompt_greedy_matches_hf(family):
    _, path, hf = family
    engine = make_engine(path)
    ids = prompt(13, 1)
    c = run_turn(engine, "a", ids, 24, start=True, end=True)
    expected, _ = hf_greedy(hf, ids, 24)
    assert c.token_ids == expected
    assert c.final.finish_reason == "length"
    assert engine.pool.counts()["used"] == 0


def test_three_turn_conversation_reuses_kv_and_matches_full_recompute(family):
    _, path, hf = family
    engine = make_engine(path)
    history: list[int] = []
    turns = [prompt(11, 2), prompt(7, 3)[1:], prompt(9, 4)[1:]]
    for i, new_tokens in enumerate(turns):
        c = run_turn(engine, 7, new_tokens, 10, start=i == 0, end=i == 2)
        expected, _ = hf_greedy(hf, history + new_tokens, 10)
        assert c.token_ids == expected, f"turn {i + 1}"
        # KV of the whole history is reused: everything but the last sampled token
        assert c.final.cached_tokens == (0 if i == 0 else len(history) - 1)
        history += new_tokens + c.token_ids
    counts = engine.pool.counts()
    assert counts["used"] == 0 and engine.stats()["live_sequences"] == 0


def test_concurrent_batch_of_different_lengths(family):
    _, path, hf = family
    engine = make_engine(path, max_num_batched_tokens=16)
    prompts = [prompt(n, 10 + n) for n in (3, 17, 6, 29, 12)]
    for p, c in zip(prompts, run_conversations(engine, prompts, 12)):
        assert c.token_ids == hf_greedy(hf, p, 12)[0]


def test_shared_prefix_is_a_cache_hit_and_gives_same_tokens(family):
    _, path, hf = family
    engine = make_engine(path)
    system = prompt(21, 5)
    first = run_turn(engine, "s1", system + [40, 41, 42], 6, start=True, end=True)
    second = run_turn(engine, "s2", system + [50, 51], 6, start=True, end=True)
    assert first.final.cached_tokens == 0
    assert second.final.cached_tokens == 20  # five full blocks of 4 from the shared 21 tokens
    assert second.token_ids == hf_greedy(hf, system + [50, 51], 6)[0]
    assert first.token_ids == hf_greedy(hf, system + [40, 41, 42], 6)[0]


def test_preemption_under_a_small_pool_gives_same_tokens(family):
    name, path, hf = family
    # 4 sequences x (20 prompt + 16 out) tokens need 36 blocks; the pool has 24
    engine = make_engine(path, num_blocks=24, max_num_batched_tokens=32)
    prompts = [prompt(20, 30 + i) for i in range(4)]
    cs = run_conversations(engine, prompts, 16)
    if name == "mistral_window":  # its window (8) returns blocks instead: nothing to preempt
        assert engine.scheduler.num_preemptions == 0 and engine.stats()["evicted_blocks_window"] > 0
    else:
        assert engine.scheduler.num_preemptions > 0
    for p, c in zip(prompts, cs):
        assert c.token_ids == hf_greedy(hf, p, 16)[0]
    assert engine.pool.counts()["used"] == 0
