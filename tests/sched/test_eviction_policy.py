"""Eviction policies and the KV manager's eviction, exactly (no torch): which blocks go back,
the cache index and rotary shift a sequence then has, the key rotations / copies queued for
the engine, and h2o's decisions surviving preemption."""

import numpy as np

from tritonkv.cache.block_pool import BlockPool
from tritonkv.cache.eviction import EvictionPolicy
from tritonkv.cache.kv_cache_manager import KVCacheManager

BS = 4


def test_window_start_and_chunk_limits():
    streaming = EvictionPolicy("streaming", BS, window=10, sink_blocks=1)
    # query 20 sees text positions (10, 20] -> from block 2 (tokens 8..11) on; never below the sinks
    assert [streaming.window_start(p) for p in (0, 9, 12, 13, 20, 21)] == [1, 1, 1, 1, 2, 3]
    # a chunk stops where the window start moves: 13..16 keep block 1 on, 17 moves it to 2
    assert streaming.max_chunk(13) == 4 and streaming.max_chunk(17) == 4 and streaming.max_chunk(0) == 17
    assert streaming.first_eviction() == 17 and streaming.cacheable_blocks() == 4
    window = EvictionPolicy("window", BS, window=10)
    assert window.max_chunk(100) == 10 and window.blocks_per_sequence(64) == 7


def test_a_stride_moves_the_window_start_by_whole_strides():
    policy = EvictionPolicy("streaming", BS, window=10, sink_blocks=1, stride_blocks=2)
    # block floor((p - 9) / 4), rounded down to even, never below 1
    assert [policy.window_start(p) for p in (16, 17, 24, 25, 33)] == [1, 2, 2, 4, 6]
    # the start moves at 25 (block 4) and 33 (block 6): chunks stop there
    assert policy.max_chunk(21) == 4 and policy.max_chunk(25) == 8 and policy.max_chunk(26) == 7
    assert policy.first_eviction() == 17 and policy.kept_blocks() == 1 + 3 + 2
    h2o = EvictionPolicy("h2o", BS, window=10, sink_blocks=1, heavy_blocks=2, stride_blocks=2)
    assert h2o.first_eviction() == 4 * BS + 9  # the start must reach block 4 (1 + 2 + 1, even)


def test_victims_streaming_and_h2o():
    streaming = EvictionPolicy("streaming", BS, window=8, sink_blocks=1)
    assert streaming.window_start(24) == 4
    assert streaming.victims([0, 2, 3, 4, 5, 6], 24) == [1, 2]  # blocks 2 and 3 (table indices 1, 2)
    h2o = EvictionPolicy("h2o", BS, window=8, sink_blocks=1, heavy_blocks=2)
    mass = np.array([9.0, 0.5, 0.2, 0.5, 0.1, 3.0, 1.0])
    # candidates: blocks 1, 2, 3 (mass .5, .2, .5); one too many: the least mass goes
    assert h2o.victims([0, 1, 2, 3, 4, 5, 6], 24, mass) == [2]
    # a tie goes to the older block
    assert h2o.victims([0, 1, 2, 3, 4, 5, 6], 24, np.array([9.0, 0.5, 0.5, 0.5, 0, 0, 0])) == [1]
    assert h2o.victims([0, 1, 2, 4, 5, 6], 24, mass[:6]) == []  # within the budget


def manager(policy, num_blocks=32, prefix=True):
    pool = BlockPool.in_process(num_blocks, BS)
    return pool, KVCacheManager(pool, 0, prefix, policy, angle_limit=64, max_chunk_tokens=16)


def test_streaming_eviction_returns_blocks_and_turns_the_sinks():
    policy = EvictionPolicy("streaming", BS, window=8, sink_blocks=1)
    pool, kv = manager(policy, prefix=False)
    kv.start("s", [])
    assert kv.grow("s", 20) and kv.block_table("s") == [0, 1, 2, 3, 4]
    assert kv.evict("s", 20)  # window from block (20 - 8 + 1) // 4 = 3: blocks 1, 2 go
    # the sink block (0) stays as written; the table reads a copy turned by the 8 evicted tokens
    (op,) = kv.take_kv_ops()
    assert (op.kind, op.src, op.dst, op.delta) == ("turn", [0], [1], 8)
    assert kv.block_table("s") == [1, 3, 4] and kv.origins("s") == [0, 3, 4]
    assert kv.cache_index("s", 20) == 12 and kv.angle_shift("s") == 8
    assert kv.held_blocks("s") == pool.counts()["used"] == 4 and kv.evicted_blocks["streaming"] == 2
    assert kv.grow("s", 21) and kv.block_table("s") == [1, 3, 4, 2]  # a freed block is reused
    assert kv.evict("s", 21) and kv.take_kv_ops() == []  # nothing more leaves yet
    assert kv.evict("s", 24)  # block 3 goes: the copy is recomputed from the original, 12 turned
    (op,) = kv.take_kv_ops()
    assert (op.kind, op.src, op.dst, op.delta) == ("turn", [0], [1], 12)
    kv.release("s")
    assert pool.counts()["used"] == 0


def test_angles_rebase_before_leaving_the_rotary_table():
    policy = EvictionPolicy("streaming", BS, window=4, sink_blocks=1)
    pool, kv = manager(policy, prefix=False)  # angle_limit 64; a table holds <= 3 blocks (12 tokens)
    kv.start("s", [])
    ops = {}
    for p in range(60):
        assert kv.evict("s", p) and kv.grow("s", p + 1)
        ops[p] = [(o.kind, o.delta, o.src, o.slots.tolist() if o.slots is not None else None)
                  for o in kv.take_kv_ops()]
    # from position 11 on, every 4th query returns one block; the sink's copy turns 4 further each time
    assert [p for p in ops if ops[p]] == list(range(11, 60, 4))
    assert ops[55] == [("turn", 48, [0], None)]
    # at 59 the shift would reach 52 (52 + 12 >= 64): every kept key turns back by 52 (the
    # recent block in place, the sink's copy from its original: 52 - 52 = 0)
    assert ops[59] == [("rotate", -52, [], [8, 9, 10, 11]), ("turn", 0, [0], None)]
    assert kv.angle_shift("s") == 0 and kv.block_table("s") == [1, 2] and kv.cache_index("s", 59) == 7


def test_turned_prefix_indexed_blocks_stay_valid_for_others():
    policy = EvictionPolicy("streaming", BS, window=8, sink_blocks=1)
    pool, kv = manager(policy)
    tokens = list(range(100, 124))
    kv.start("a", tokens)
    assert kv.grow("a", 24)
    # registers the blocks wholly before the first evicting position, 15: blocks 0..2
    kv.commit("a", tokens)
    assert policy.first_eviction() == 15
    assert kv.evict("a", 24)  # blocks 1..3 go; the sink block 0 turns as a copy in block 3
    (op,) = kv.take_kv_ops()
    assert (op.kind, op.src, op.dst, op.delta) == ("turn", [0], [3], 12)
    assert kv.block_table("a") == [3, 4, 5]
    c = pool.counts()
    assert c["used"] == 4 and c["cached"] == 2  # block 0 is held as the original, 1 and 2 cached
    kv.start("b", tokens)
    assert kv.block_table("b") == [0, 1, 2]  # a new sequence reads the unturned blocks


def test_h2o_decisions_replay_after_preemption():
    policy = EvictionPolicy("h2o", BS, window=4, sink_blocks=1, heavy_blocks=1)
    pool, kv = manager(policy, prefix=False)
    kv.start("s", [])
    assert kv.grow("s", 16) and kv.origins("s") == [0, 1, 2, 3]
    kv.add_mass("s", [0, 1, 2, 3], np.array([4.0, 0.1, 2.0, 1.0]))
    assert kv.evict("s", 16)  # window from block 3; blocks 1, 2 compete for one heavy place
    assert kv.origins("s") == [0, 2, 3]
    kv.preempt("s")
    assert pool.counts()["used"] == 0
    kv.start("s", [])
    assert kv.grow("s", 16)
    # the recompute has no mass yet (prefill), but evicts what was evicted at the same position
    assert kv.evict("s", 16) and kv.origins("s") == [0, 2, 3]
    assert kv._seqs["s"].mass.tolist() == [4.0, 2.0, 1.0]  # the mass came back with the blocks
    kv.release("s")
    assert pool.counts()["used"] == 0 and kv.evicted_blocks["h2o"] == 2
