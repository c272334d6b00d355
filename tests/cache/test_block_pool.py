"""Exact block ids, refcounts, hash hits and eviction order; two KV managers on one pool stand
for two owners of blocks (the engine core's one pool serves every frontend)."""

import numpy as np
import pytest

from tritonkv.cache.block_hash import NO_HASH, hash_full_blocks
from tritonkv.cache.block_pool import BlockPool, PoolExhausted
from tritonkv.cache.kv_cache_manager import KVCacheManager

BS = 4
SALT_1, SALT_2 = (("cache_salt", "tenant-1"),), (("cache_salt", "tenant-2"),)


@pytest.fixture
def two_instances():
    """(pool, manager A, manager B) over one pool of 8 blocks x 4 tokens."""
    pool = BlockPool.in_process(8, BS)
    return pool, KVCacheManager(pool, 0), KVCacheManager(pool, 1)


def run_prefill(mgr, seq_id, tokens, extra_keys=()):
    """What the engine does for one prompt: start, grow, write, commit. Returns cached tokens."""
    cached = mgr.start(seq_id, tokens, extra_keys)
    assert mgr.grow(seq_id, len(tokens))
    mgr.commit(seq_id, tokens)
    return cached


def test_shared_prefix_is_reused_by_the_other_instance(two_instances):
    pool, a, b = two_instances
    assert run_prefill(a, "a", list(range(10))) == 0
    assert a.block_table("a") == [0, 1, 2]
    # b shares the first two full blocks, then diverges in a new block
    assert run_prefill(b, "b", list(range(8)) + [50, 51, 52]) == 8
    assert b.block_table("b") == [0, 1, 3]
    assert pool.arrays.refcount[:5].tolist() == [2, 2, 1, 1, 0]
    assert pool.arrays.owner_refs[0, :5].tolist() == [1, 1, 1, 0, 0]
    assert pool.arrays.owner_refs[1, :5].tolist() == [1, 1, 0, 1, 0]
    c = pool.counts()
    assert (c["used"], c["cached"], c["free"]) == (4, 0, 4)
    assert (c["prefix_query_blocks"], c["prefix_hit_blocks"]) == (4, 2)
    a.release("a")
    b.release("b")
    c = pool.counts()
    # blocks 0, 1 stay cached; 2 and 3 were never full, so they are free again
    assert (c["used"], c["cached"], c["free"]) == (0, 2, 6)
    assert pool.arrays.refcount.sum() == 0


def test_divergence_mid_block_reuses_only_the_blocks_before_it(two_instances):
    pool, a, b = two_instances
    prompt = list(range(100, 113))  # 13 tokens: 3 full blocks + 1
    run_prefill(a, "a", prompt)
    assert a.block_table("a") == [0, 1, 2, 3]
    a.release("a")
    assert pool.arrays.block_hash[:4].tolist()[3] == NO_HASH and (pool.arrays.block_hash[:3] != NO_HASH).all()
    diverged = prompt[:6] + [7] * 7  # differs at token 6, inside block 1
    assert run_prefill(b, "b", diverged) == 4
    # block 0 reused; the new blocks come from the free list (3, 4, 5), cached 1 and 2 survive
    assert b.block_table("b") == [0, 3, 4, 5]
    c = pool.counts()
    assert (c["used"], c["cached"], c["free"], c["reclaimed"]) == (4, 2, 2, 0)


def test_full_reuse_never_covers_the_last_prompt_token(two_instances):
    pool, a, b = two_instances
    run_prefill(a, "a", list(range(9)))
    a.release("a")
    assert run_prefill(b, "same", list(range(9))) == 8
    assert b.block_table("same") == [0, 1, 2]
    b.release("same")
    # a prompt of exactly two blocks: its last token must be computed, so one block is reused
    assert run_prefill(b, "exact", list(range(8))) == 4
    assert b.block_table("exact") == [0, 2]


def test_eviction_under_pressure_is_lru_tail_first(two_instances):
    pool, a, b = two_instances
    run_prefill(a, "a", list(range(12)))  # blocks 0, 1, 2 all full and registered
    a.release("a")
    run_prefill(a, "c", list(range(40, 52)))  # blocks 3, 4, 5
    a.release("c")
    assert pool.counts()["cached"] == 6
    # 4 blocks, 2 free (6, 7): the 2 least recently used cached go, a chain's tail first
    assert b.start("d", list(range(60, 76))) == 0
    assert b.grow("d", 16)
    assert b.block_table("d") == [6, 7, 2, 1]
    c = pool.counts()
    assert (c["used"], c["cached"], c["free"], c["reclaimed"]) == (4, 4, 0, 2)
    assert pool.arrays.block_hash[[1, 2]].tolist() == [NO_HASH, NO_HASH]
    # a's prompt now hits its surviving head block only
    assert a.start("a2", list(range(12))) == 4
    assert a.block_table("a2") == [0]
    # nothing left to give: used 5, the 3 cached blocks of "c" are evictable
    assert not b.grow("d", 16 + 4 * 4)  # 4 more needed, 3 evictable: nothing changes
    assert b.block_table("d") == [6, 7, 2, 1] and pool.counts()["reclaimed"] == 2
    with pytest.raises(PoolExhausted):
        pool.allocate(4, a.owner)


def test_cache_salt_separates_tenants(two_instances):
    pool, a, b = two_instances
    prompt = list(range(9))
    assert hash_full_blocks(prompt, BS, SALT_1)[-1] != hash_full_blocks(prompt, BS, SALT_2)[-1]
    run_prefill(a, "t1", prompt, SALT_1)
    a.release("t1")
    assert run_prefill(b, "t2", prompt, SALT_2) == 0  # other tenant: no hit
    assert run_prefill(b, "nosalt", prompt) == 0  # no salt is a namespace of its own too
    b.release("t2")
    b.release("nosalt")
    assert run_prefill(b, "t1-again", prompt, SALT_1) == 8  # same tenant on the other instance
    assert b.block_table("t1-again")[:2] == [0, 1]
    assert pool.counts()["prefix_hit_blocks"] == 2
    assert pool.counts()["prefix_query_blocks"] == 8


def test_hash_hit_is_verified_against_stored_tokens(two_instances):
    pool, a, _ = two_instances
    h = hash_full_blocks([1, 2, 3, 4], BS)[0]
    pool.register(5, h, NO_HASH, [1, 2, 3, 4])
    assert pool.find(h, NO_HASH, np.array([1, 2, 3, 4], np.int32)) == 5
    # the same hash with other tokens or another parent (a forged collision) is a miss
    assert pool.find(h, NO_HASH, np.array([1, 2, 3, 5], np.int32)) is None
    assert pool.find(h, 12345, np.array([1, 2, 3, 4], np.int32)) is None
    assert pool.acquire_cached_prefix([h], [9, 9, 9, 9], a.owner) == []
    assert pool.acquire_cached_prefix([h], [1, 2, 3, 4], a.owner) == [5]
    assert pool.arrays.refcount[5] == 1


def test_release_of_a_block_not_held_is_refused(two_instances):
    pool, a, b = two_instances
    blocks = pool.allocate(2, a.owner)
    with pytest.raises(ValueError, match="does not hold"):
        pool.release(blocks, b.owner)
    assert pool.arrays.refcount[blocks].tolist() == [1, 1]


def test_release_owner_drops_every_reference_of_that_owner(two_instances):
    pool, a, b = two_instances
    run_prefill(a, "a", list(range(9)))
    run_prefill(b, "b", list(range(9)))  # shares blocks 0, 1
    assert pool.release_owner(a.owner) == 3
    assert pool.arrays.refcount[:4].tolist() == [1, 1, 0, 1]
    assert (pool.arrays.refcount == pool.arrays.owner_refs.sum(axis=0)).all()


def test_a_reclaimed_head_block_is_not_found_under_its_old_hash():
    """The head block of a chain (parent NO_HASH) reclaimed and handed out, not yet written:
    a query for its old tokens misses (the hash lookup must forget it; its stored tokens and
    parent still match), and once the new owner commits, the block is found under its new
    hash only."""
    pool = BlockPool.in_process(2, BS)
    a, b = KVCacheManager(pool, 0), KVCacheManager(pool, 1)
    old = [1, 2, 3, 4, 5]
    run_prefill(a, "a", old)  # block 0 holds [1, 2, 3, 4] (registered), block 1 the partial tail
    a.release("a")
    assert pool.counts()["cached"] == 1
    b.start("b", [9, 9, 9, 9, 9, 9])
    assert b.grow("b", 6) and b.block_table("b") == [1, 0]  # block 1 free first, then 0 reclaimed
    assert pool.find(hash_full_blocks(old, BS)[0], NO_HASH, np.asarray(old[:4], np.int32)) is None
    assert a.start("a2", old) == 0
    a.release("a2")
    b.commit("b", [9, 9, 9, 9, 9, 9])  # block 1 now holds [9, 9, 9, 9]
    new_hash = hash_full_blocks([9] * 4, BS)[0]
    assert pool.find(new_hash, NO_HASH, np.asarray([9] * 4, np.int32)) == 1
    b.release("b")
    assert run_prefill(a, "a3", [9] * 5) == 4 and a.block_table("a3")[0] == 1


def test_free_blocks_go_lowest_id_first_after_a_refusal_a_release_and_a_dead_owner():
    pool = BlockPool.in_process(5, BS)
    assert pool.allocate(3, 0) == [0, 1, 2]
    with pytest.raises(PoolExhausted):
        pool.allocate(3, 1)  # 2 free: refused, and the 2 stay free
    assert pool.counts()["free"] == 2
    pool.release([1], 0)
    assert pool.allocate(2, 1) == [1, 3]
    pool.release([3], 1)
    pool.take_ref([0], 1)  # block 0: one reference from each owner
    assert pool.release_owner(0) == 2  # owner 0 held 0 and 2; block 0 is still owner 1's, 1 too
    assert pool.arrays.refcount.tolist() == [1, 1, 0, 0, 0]
    assert pool.allocate(3, 0) == [2, 3, 4]
    with pytest.raises(PoolExhausted):
        pool.allocate(1, 0)


def test_of_two_blocks_holding_one_prefix_a_hit_takes_the_lower_id():
    """Two rows with one prompt fill a block each and both register it (in either order)."""
    for order in ((1, 0), (0, 1)):
        pool = BlockPool.in_process(4, BS)
        a, b = pool.allocate(1, 0), pool.allocate(1, 1)
        assert (a, b) == ([0], [1])
        h = hash_full_blocks([5, 6, 7, 8], BS)[0]
        for block in order:
            pool.register(block, h, NO_HASH, [5, 6, 7, 8])
        pool.release(a, 0)
        pool.release(b, 1)
        assert pool.acquire_cached_prefix([h], [5, 6, 7, 8], 2) == [0]


def test_a_failing_reclaim_callback_changes_nothing():
    pool = BlockPool.in_process(3, BS)
    assert pool.allocate(1, 0) == [0]
    pool.register(0, hash_full_blocks([1, 2, 3, 4], BS)[0], NO_HASH, [1, 2, 3, 4])
    pool.release([0], 0)  # block 0 cached, 1 and 2 free

    def refuse(blocks):
        raise RuntimeError("host tier copy failed")

    pool.on_reclaim = refuse
    with pytest.raises(RuntimeError):
        pool.allocate(3, 1)  # needs the cached block: the callback fails
    assert pool.counts()["cached"] == 1 and pool.counts()["free"] == 2
    pool.on_reclaim = None
    assert pool.allocate(2, 1) == [1, 2]
