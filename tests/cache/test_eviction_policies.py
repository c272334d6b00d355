"""Eviction policies, exactly (no torch, no pool): which blocks go back, chunk limits, the
prefix-shareable blocks, the per-sequence bounds, and the policy chosen from the settings."""

import numpy as np
import pytest

from tritonkv.cache.eviction.choose import KV_EVICTION_POLICIES, policy_for
from tritonkv.cache.eviction.h2o import HeavyHitterOracle
from tritonkv.cache.eviction.none import NoEviction
from tritonkv.cache.eviction.streaming import StreamingLLM
from tritonkv.cache.eviction.window import SlidingWindow
from tritonkv.config import KV_EVICTIONS, EngineConfig

BS = 4


def test_window_start_and_chunk_limits():
    streaming = StreamingLLM(BS, window=10, sink_tokens=BS)
    # query 20 sees text positions (10, 20] -> from block 2 (tokens 8..11) on; never below the sinks
    assert [streaming.window_start(p) for p in (0, 9, 12, 13, 20, 21)] == [1, 1, 1, 1, 2, 3]
    # a chunk stops where the window start moves: 13..16 keep block 1 on, 17 moves it to 2
    assert streaming.max_chunk(13) == 4 and streaming.max_chunk(17) == 4 and streaming.max_chunk(0) == 17
    assert streaming.first_eviction() == 17 and streaming.cacheable_blocks() == 4
    window = SlidingWindow(BS, window=10)
    assert window.max_chunk(100) == 10 and window.blocks_per_sequence(64) == 7


def test_a_stride_moves_the_window_start_by_whole_strides():
    policy = StreamingLLM(BS, window=10, sink_tokens=BS, stride_tokens=2 * BS)
    # block floor((p - 9) / 4), rounded down to even, never below 1
    assert [policy.window_start(p) for p in (16, 17, 24, 25, 33)] == [1, 2, 2, 4, 6]
    # the start moves at 25 (block 4) and 33 (block 6): chunks stop there
    assert policy.max_chunk(21) == 4 and policy.max_chunk(25) == 8 and policy.max_chunk(26) == 7
    assert policy.first_eviction() == 17 and policy.kept_blocks() == 1 + 3 + 2
    h2o = HeavyHitterOracle(BS, window=10, sink_tokens=BS, stride_tokens=2 * BS, heavy_tokens=2 * BS)
    assert h2o.first_eviction() == 4 * BS + 9  # the start must reach block 4 (1 + 2 + 1, even)


def test_victims_streaming_and_h2o():
    streaming = StreamingLLM(BS, window=8, sink_tokens=1)
    assert streaming.window_start(24) == 4
    assert streaming.victims([0, 2, 3, 4, 5, 6], 24) == [1, 2]  # blocks 2 and 3 (table indices 1, 2)
    h2o = HeavyHitterOracle(BS, window=8, sink_tokens=1, heavy_tokens=5)
    mass = np.array([9.0, 0.5, 0.2, 0.5, 0.1, 3.0, 1.0])
    # candidates: blocks 1, 2, 3 (mass .5, .2, .5); one too many: the least mass goes
    assert h2o.victims([0, 1, 2, 3, 4, 5, 6], 24, mass) == [2]
    # a tie goes to the older block
    assert h2o.victims([0, 1, 2, 3, 4, 5, 6], 24, np.array([9.0, 0.5, 0.5, 0.5, 0, 0, 0])) == [1]
    assert h2o.victims([0, 1, 2, 4, 5, 6], 24, mass[:6]) == []  # within the budget


def test_window_model_returns_blocks_wholly_before_its_window():
    window = SlidingWindow(BS, window=6)
    # query 12 sees (6, 12]: from block 1 (tokens 4..7) on
    assert window.window_start(12) == 1 and window.victims([0, 1, 2, 3], 12) == [0]
    assert window.victims([1, 2, 3], 12) == [] and window.victims([1, 2, 3, 4], 17) == [0, 1]
    assert window.cacheable_blocks() >= 1 << 40  # text positions: every full block is shareable
    # the window (6) and one chunk (at most max(6, BS) tokens), plus two partial blocks
    assert window.blocks_per_sequence(1) == 2 + 2 and window.blocks_per_sequence(100) == 3 + 2
    assert window.max_model_len(0, 8192, 64) == 8192 and window.context_limit(8192) == 8192


def test_stride_bound_is_what_a_sequence_holds():
    # window 2048, 4 sink tokens, stride 256, blocks of 16: 1 sink block + 128 window blocks +
    # 16 stride blocks in the table, plus the sink's written original = 146 blocks
    policy = StreamingLLM(16, window=2048, sink_tokens=4, stride_tokens=256)
    assert (policy.sink_blocks, policy.stride_blocks, policy.kept_blocks()) == (1, 16, 145)
    assert policy.blocks_per_sequence(1) == policy.blocks_per_sequence(1024) == 146
    h2o = HeavyHitterOracle(16, window=2048, sink_tokens=4, stride_tokens=256, heavy_tokens=100)
    assert h2o.heavy_blocks == 7 and h2o.blocks_per_sequence(1) == 146 + 2 * 7
    assert policy.context_limit(8192) is None and policy.max_model_len(9000, 8192, 4096) == 4096


def test_the_policy_is_chosen_once_from_the_settings():
    assert type(policy_for(EngineConfig())) is NoEviction
    assert type(policy_for(EngineConfig(), model_window=4096)) is SlidingWindow
    streaming = policy_for(EngineConfig(kv_eviction="streaming", kv_window=64, attention_sinks=8, block_size=4))
    assert type(streaming) is StreamingLLM and (streaming.sink_blocks, streaming.window) == (2, 64)
    h2o = policy_for(EngineConfig(kv_eviction="h2o", kv_window=64, heavy_hitter_tokens=9, block_size=4,
                                  kv_window_stride=8))
    assert type(h2o) is HeavyHitterOracle and (h2o.heavy_blocks, h2o.stride_blocks) == (3, 2)
    assert [p.needs_attention_mass for p in (streaming, h2o)] == [False, True]
    assert set(KV_EVICTION_POLICIES) == set(KV_EVICTIONS) == {"none", "streaming", "h2o"}
    with pytest.raises(ValueError, match=r"'kv_eviction' = 'streaming': this model attends a sliding window of 16"):
        policy_for(EngineConfig(kv_eviction="streaming", kv_window=64), model_window=16)


def test_no_eviction_keeps_everything():
    policy = NoEviction(BS)
    assert not policy.evicts and policy.victims([0, 1, 2], 1000) == []
    assert policy.blocks_per_sequence(1) is None and policy.max_model_len(100, 8192, 64) == 64


@pytest.mark.parametrize("settings, message", [
    (dict(kv_eviction="streaming"), "'kv_window' = 0: must be > 0 tokens with kv_eviction='streaming'"),
    (dict(kv_eviction="h2o", kv_window=8), "'heavy_hitter_tokens' = 0: must be > 0 with kv_eviction='h2o'"),
    (dict(kv_eviction="h2o", kv_window=8, attention_sinks=9, heavy_hitter_tokens=4), "'attention_sinks' = 9"),
    (dict(kv_eviction="streaming", kv_window=8, kv_cache_dtype="int8"), "'kv_cache_dtype' = 'int8': fp8 / int8"),
    (dict(kv_eviction="lru"), "'kv_eviction' = 'lru': must be one of"),
])
def test_each_policy_refuses_settings_it_cannot_serve(settings, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**settings)
