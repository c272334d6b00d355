"""KVCacheManager over a real BlockPool, exactly (no torch): block ids, refcounts and pool
states after start / grow / commit / release / preempt, prefix sharing, and what eviction
returns, re-rotates and replays."""

import numpy as np
import pytest

from tritonkv.cache.block_pool import BlockPool
from tritonkv.cache.eviction.h2o import HeavyHitterOracle
from tritonkv.cache.eviction.streaming import StreamingLLM
from tritonkv.cache.eviction.window import SlidingWindow
from tritonkv.cache.kv_cache_manager import KVCacheManager

BS = 4


def manager(policy, num_blocks=32, prefix=True):
    pool = BlockPool.in_process(num_blocks, BS)
    return pool, KVCacheManager(pool, 0, prefix, policy, angle_limit=64)


def test_streaming_eviction_returns_blocks_and_turns_the_sinks():
    policy = StreamingLLM(BS, window=8, sink_tokens=1)
    pool, kv = manager(policy, prefix=False)
    kv.start("s", [])
    assert kv.grow("s", 20) and kv.block_table("s") == [0, 1, 2, 3, 4]
    assert kv.evict("s", 20)  # window from block (20 - 8 + 1) // 4 = 3: blocks 1, 2 go
    # the sink block (0) stays as written; the table reads a copy re-rotated by the 8 evicted tokens
    (op,) = kv.take_kv_ops()
    assert (op.kind, op.src, op.dst, op.delta) == ("rerotated_copy", [0], [1], 8)
    assert kv.block_table("s") == [1, 3, 4] and kv.origins("s") == [0, 3, 4]
    assert kv.cache_index("s", 20) == 12 and kv.angle_shift("s") == 8
    assert kv.held_blocks("s") == pool.counts()["used"] == 4 and kv.evicted_blocks["streaming"] == 2
    assert kv.grow("s", 21) and kv.block_table("s") == [1, 3, 4, 2]  # a freed block is reused
    assert kv.evict("s", 21) and kv.take_kv_ops() == []  # nothing more leaves yet
    assert kv.evict("s", 24)  # block 3 goes: the copy is recomputed from the original, 12 re-rotated
    (op,) = kv.take_kv_ops()
    assert (op.kind, op.src, op.dst, op.delta) == ("rerotated_copy", [0], [1], 12)
    kv.release("s")
    assert pool.counts()["used"] == 0


def test_angles_rebase_before_leaving_the_rotary_table():
    policy = StreamingLLM(BS, window=4, sink_tokens=BS)
    pool, kv = manager(policy, prefix=False)  # angle_limit 64; a table holds <= 3 blocks (12 tokens)
    kv.start("s", [])
    ops = {}
    for p in range(60):
        assert kv.evict("s", p) and kv.grow("s", p + 1)
        ops[p] = [(o.kind, o.delta, o.src, o.slots.tolist() if o.slots is not None else None)
                  for o in kv.take_kv_ops()]
    # from position 11 on, every 4th query returns one block; the sink's copy is re-rotated 4 further each time
    assert [p for p in ops if ops[p]] == list(range(11, 60, 4))
    assert ops[55] == [("rerotated_copy", 48, [0], None)]
    # at 59 the shift would reach 52 (52 + 12 >= 64): every kept key turns back by 52 (the
    # recent block in place, the sink's copy from its original: 52 - 52 = 0)
    assert ops[59] == [("rotate", -52, [], [8, 9, 10, 11]), ("rerotated_copy", 0, [0], None)]
    assert kv.angle_shift("s") == 0 and kv.block_table("s") == [1, 2] and kv.cache_index("s", 59) == 7


def test_rerotated_prefix_indexed_blocks_stay_valid_for_others():
    policy = StreamingLLM(BS, window=8, sink_tokens=1)
    pool, kv = manager(policy)
    tokens = list(range(100, 124))
    kv.start("a", tokens)
    assert kv.grow("a", 24)
    # registers the blocks wholly before the first evicting position, 15: blocks 0..2
    kv.commit("a", tokens)
    assert policy.first_eviction() == 15
    assert kv.evict("a", 24)  # blocks 1..3 go; the sink block 0 turns as a copy in block 3
    (op,) = kv.take_kv_ops()
    assert (op.kind, op.src, op.dst, op.delta) == ("rerotated_copy", [0], [3], 12)
    assert kv.block_table("a") == [3, 4, 5]
    c = pool.counts()
    assert c["used"] == 4 and c["cached"] == 2  # block 0 is held as the original, 1 and 2 cached
    kv.start("b", tokens)
    assert kv.block_table("b") == [0, 1, 2]  # a new sequence reads the unre-rotated blocks


def test_h2o_decisions_replay_after_preemption():
    policy = HeavyHitterOracle(BS, window=4, sink_tokens=BS, heavy_tokens=BS)
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


def test_prefix_hit_shares_full_blocks_and_counts_references():
    pool, kv = manager(None)
    a = list(range(10, 20))  # 10 tokens: blocks 0, 1 full, block 2 partial
    assert kv.start("a", a) == 0 and kv.grow("a", 10) and kv.block_table("a") == [0, 1, 2]
    kv.commit("a", a)  # registers the two full blocks only
    b = a[:8] + [98, 99]
    assert kv.start("b", b) == 8 and kv.block_table("b") == [0, 1]
    assert kv.grow("b", 10) and kv.block_table("b") == [0, 1, 3]
    assert pool.refcounts([0, 1, 2, 3]) == [2, 2, 1, 1]
    kv.release("a")
    assert pool.refcounts([0, 1, 2, 3]) == [1, 1, 0, 1]
    assert pool.counts()["used"] == 3 and pool.counts()["free"] == 29  # block 2 had no hash: free
    kv.release("b")
    c = pool.counts()
    assert (c["used"], c["cached"], c["free"]) == (0, 2, 30)  # blocks 0 and 1 stay in the prefix index


def test_a_prefix_hit_never_covers_the_last_prompt_token():
    pool, kv = manager(None)
    tokens = list(range(8))  # exactly two full blocks
    kv.start("a", tokens)
    kv.grow("a", 8)
    kv.commit("a", tokens)
    assert kv.start("b", tokens) == 4 and kv.block_table("b") == [0]  # block 1 must be recomputed
    assert kv.start("c", tokens + [8]) == 8 and kv.block_table("c") == [0, 1]


def test_grow_changes_nothing_when_the_pool_runs_out():
    pool, kv = manager(None, num_blocks=3)
    kv.start("a", [])
    assert kv.grow("a", 12) and kv.block_table("a") == [0, 1, 2]
    kv.start("b", [])
    assert not kv.grow("b", 1)
    assert kv.block_table("b") == [] and pool.refcounts([0, 1, 2]) == [1, 1, 1]
    with pytest.raises(KeyError, match="already holds KV blocks"):
        kv.start("a", [])


def test_cached_blocks_are_reused_least_recently_used_first():
    pool, kv = manager(None, num_blocks=4)
    a = list(range(10))
    kv.start("a", a)
    kv.grow("a", 10)
    kv.commit("a", a)
    kv.release("a")  # 0, 1 cached (1, the chain's end, is older: it goes first); 2 free
    kv.start("b", [7] * 16)
    assert kv.grow("b", 16) and kv.block_table("b") == [2, 3, 1, 0]
    assert pool.counts()["reclaimed"] == 2 and pool.counts()["cached"] == 0


def test_without_prefix_caching_nothing_is_registered():
    pool, kv = manager(None, prefix=False)
    a = list(range(10))
    assert kv.start("a", a) == 0
    kv.grow("a", 10)
    kv.commit("a", a)
    kv.release("a")
    assert kv.start("b", a) == 0 and pool.counts()["cached"] == 0


def test_preemption_releases_every_block_and_counts_them():
    pool, kv = manager(None)
    kv.start("a", [])
    kv.grow("a", 9)
    kv.preempt("a")
    assert "a" not in kv and kv.preempted_blocks == 3 and pool.counts()["used"] == 0


def test_a_window_model_returns_blocks_before_the_window_without_rotating():
    pool, kv = manager(SlidingWindow(BS, window=6))
    kv.start("s", [])
    assert kv.grow("s", 12) and kv.block_table("s") == [0, 1, 2]
    assert kv.evict("s", 12)  # query 12 sees (6, 12]: block 0 goes back
    assert kv.block_table("s") == [1, 2] and kv.origins("s") == [1, 2]
    assert kv.take_kv_ops() == [] and pool.refcounts([0, 1, 2]) == [0, 1, 1]
    # a token keeps its text position: cache index 8, rotary angle 8 + 4
    assert kv.cache_index("s", 12) == 8 and kv.angle_shift("s") == 4
    assert kv.grow("s", 13) and kv.block_table("s") == [1, 2, 0]  # the returned block is reused
    assert kv.evicted_blocks == {"window": 1, "streaming": 0, "h2o": 0}
