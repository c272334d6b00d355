"""StreamingLLM and H2O: the paged engine equals a dense reference of the same policy
(tests/engine/dense_policy_reference.py: plain torch, no pool) token for token in fp32,
across evictions, key re-rotations (positions inside the cache), rebasing of angles,
multi-turn continuation, chunked prefill, preemption and prefix-cache hits; conversations
run past max_model_len and past the pool's capacity with bounded blocks."""

import pytest

from bounded_models import build_checkpoint, prompt, run_tracking_blocks, single_thread  # noqa: F401
from dense_policy_reference import DensePolicyReference, reference_turn
from engine_helpers import TEST_DEVICE, make_engine, run_conversations, run_turn

BS = 4
MAX_POS = 128  # small: angles are rebased every ~100 evicted tokens
POLICIES = {
    "streaming": dict(kv_eviction="streaming", attention_sinks=4, kv_window=16),
    "h2o": dict(kv_eviction="h2o", attention_sinks=2, kv_window=12, heavy_hitter_tokens=8),
}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama_p128"))
    return path, build_checkpoint(path, seed=5, max_position_embeddings=MAX_POS)


def reference(hf, mode):
    p = POLICIES[mode]
    return DensePolicyReference(hf, mode, BS, p["kv_window"], p["attention_sinks"], p.get("heavy_hitter_tokens", 0))


@pytest.mark.parametrize("mode", sorted(POLICIES))
def test_long_stream_equals_dense_reference_with_bounded_blocks(llama, mode):
    path, hf = llama
    engine = make_engine(path, block_size=BS, num_blocks=24, **POLICIES[mode])  # 96 tokens of KV
    ids = prompt(9, 1)
    c, most, table = run_tracking_blocks(engine, "s", ids, 300, end=False)
    ref = reference(hf, mode)
    expected = reference_turn(ref, ids, 300, [], follow=c.token_ids)
    assert c.token_ids == expected
    assert c.final.finish_reason == "length"  # 309 tokens: past max_model_len (96) and MAX_POS
    assert table == ref.most_kept_blocks == engine.policy.kept_blocks()
    # in the pool: the table plus the written originals of the re-rotated sink / heavy blocks
    assert most == engine.policy.blocks_per_sequence(1024) == table + (engine.policy.sink_blocks +
                                                                      engine.policy.heavy_blocks)
    # the same blocks are kept (h2o: the same heavy hitters chosen by mass)
    kept = engine.kv.origins(engine._live["s"].seq_id)
    assert kept == ref.kept
    run_turn(engine, "s", [], 1, start=False, end=True, close_only=True)
    stats = engine.stats()
    assert stats[f"evicted_blocks_{mode}"] == kept[-1] + 1 - len(kept)  # every other block went back
    assert stats["used"] == 0 and stats["preemptions"] == 0


@pytest.mark.parametrize("mode", sorted(POLICIES))
def test_multi_turn_and_chunked_prefill_equal_dense_reference(llama, mode):
    path, hf = llama
    engine = make_engine(path, block_size=BS, num_blocks=24, max_num_batched_tokens=16, **POLICIES[mode])
    ref, pending = reference(hf, mode), []
    turns = [prompt(30, 2), prompt(50, 3)[1:], prompt(6, 4)[1:]]  # turn 2: a prefill past the window
    for i, new in enumerate(turns):
        c = run_turn(engine, "m", new, 40, start=i == 0, end=i == 2)
        assert c.token_ids == reference_turn(ref, new, 40, pending, follow=c.token_ids), f"turn {i + 1}"
    assert engine.pool.counts()["used"] == 0


@pytest.mark.parametrize("mode", sorted(POLICIES))
def test_preemption_recomputes_the_same_evictions(llama, mode):
    path, hf = llama
    per_seq = make_engine(path, block_size=BS, num_blocks=24, **POLICIES[mode]).policy.blocks_per_sequence(32)
    engine = make_engine(path, block_size=BS, num_blocks=per_seq + 4, max_num_batched_tokens=32, **POLICIES[mode])
    prompts = [prompt(12, 20 + i) for i in range(3)]
    cs = run_conversations(engine, prompts, 90)
    assert engine.scheduler.num_preemptions > 0
    for p, c in zip(prompts, cs):
        assert c.token_ids == reference_turn(reference(hf, mode), p, 90, [], follow=c.token_ids)
    assert engine.pool.counts()["used"] == 0


def test_prefix_hits_stop_where_eviction_starts(llama):
    path, hf = llama
    engine = make_engine(path, block_size=BS, num_blocks=64, **POLICIES["streaming"])
    first = prompt(60, 7)
    a = run_turn(engine, "a", first, 20, start=True, end=True)
    b = run_turn(engine, "b", first, 20, start=True, end=True)
    # blocks wholly before the first position that evicts hold plain KV: only those are shared
    assert b.final.cached_tokens == engine.policy.cacheable_blocks() * BS == 20
    expected = reference_turn(reference(hf, "streaming"), first, 20, [])
    assert a.token_ids == b.token_ids == expected
    assert engine.pool.counts()["used"] == 0


def _overlap_on_cpu(engine, monkeypatch) -> list:
    """Pretend decode graphs exist, so the engine launches step n+1 before reading step n back
    (steps still run eagerly); returns the list of each continuation attempt's outcome."""
    engine.runner.graphs = {(1, 1): None}
    monkeypatch.setattr(engine.runner, "_graph_key", lambda n, max_len: None)
    continued, real = [], engine._continue_pending
    monkeypatch.setattr(engine, "_continue_pending", lambda: continued.append(real()) or continued[-1])
    return continued


def _batch(engine, prompts, max_tokens):
    return [c.token_ids for c in run_conversations(engine, prompts, [max_tokens + 7 * i for i in range(len(prompts))])]


@pytest.mark.parametrize("mode", sorted(POLICIES))
def test_overlapped_steps_evict_as_plain_steps(llama, mode, monkeypatch):
    """Evicting while a step is in flight (the engine's CUDA overlap, forced on the CPU) gives
    the reference's tokens; h2o does not overlap a step that must choose by mass."""
    path, hf = llama
    engine = make_engine(path, block_size=BS, num_blocks=40, **POLICIES[mode])
    continued = _overlap_on_cpu(engine, monkeypatch)
    prompts = [prompt(10 + 3 * i, 40 + i) for i in range(3)]
    got = _batch(engine, prompts, 80)
    for i, (p, tokens) in enumerate(zip(prompts, got)):
        assert tokens == reference_turn(reference(hf, mode), p, 80 + 7 * i, [], follow=tokens)
    # (h2o: a block_size-th of each sequence's steps must read the mass back first)
    assert sum(continued) > (80 if mode == "streaming" else 20) and not all(continued)
    assert engine.stats()[f"evicted_blocks_{mode}"] > 0 and engine.pool.counts()["used"] == 0


@pytest.mark.skipif(TEST_DEVICE != "cuda", reason="CUDA graphs need TRITONKV_TEST_DEVICE=cuda")
@pytest.mark.parametrize("mode", sorted(POLICIES))
def test_graphs_and_overlap_evict_as_eager_steps(llama, mode):
    path, _ = llama
    prompts = [prompt(10 + 3 * i, 50 + i) for i in range(5)]
    graphs = make_engine(path, block_size=BS, num_blocks=64, enable_cuda_graphs=True, **POLICIES[mode])
    got = _batch(graphs, prompts, 120)
    assert graphs.step_times.kinds["decode_graph"].steps > 0
    assert got == _batch(make_engine(path, block_size=BS, num_blocks=64, enable_cuda_graphs=False,
                                     **POLICIES[mode]), prompts, 120)


@pytest.mark.parametrize("mode", sorted(POLICIES))
def test_a_wider_window_moves_in_strides_and_prefills_in_longer_chunks(tmp_path_factory, mode):
    """kv_window_stride 8: the window start moves 2 blocks at a time, so a prefill past the
    window runs in chunks of up to 8 tokens (not 4); still the reference's tokens."""
    path = str(tmp_path_factory.mktemp("llama_p256"))
    hf = build_checkpoint(path, seed=6, max_position_embeddings=256)
    policy = {**POLICIES[mode], "kv_window": 64, "kv_window_stride": 8}
    engine = make_engine(path, block_size=BS, num_blocks=48, max_num_batched_tokens=64, **policy)
    assert engine.policy.stride_blocks == 2
    chunks = []
    real = engine.runner.launch
    engine.runner.launch = lambda rows, prev=None: chunks.append(len(rows[0].token_ids)) or real(rows, prev)
    ids = prompt(150, 8)
    c = run_turn(engine, "w", ids, 120, start=True, end=True)
    ref = DensePolicyReference(hf, mode, BS, 64, policy["attention_sinks"], policy.get("heavy_hitter_tokens", 0),
                               kv_window_stride=8)
    assert c.token_ids == reference_turn(ref, ids, 120, [], follow=c.token_ids)
    assert 8 in chunks and max(chunks[1:chunks.index(1)]) == 8  # after the first chunk, strides of 8
    assert engine.stats()[f"evicted_blocks_{mode}"] > 0 and engine.pool.counts()["used"] == 0
