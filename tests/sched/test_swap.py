"""Host-tier swap decisions, exact (no engine, no torch): which blocks go out and come back,
their ids on each tier, refcounts, and what the tier drops when full. Pools of 4-token
blocks; the engine's part between steps is played by ``advance`` (tests/sched/test_scheduler.py)."""

from __future__ import annotations

import random

from test_scheduler import BS, SAMPLED, advance, prompt, running, shape

from tritonkv.cache.block_pool import BlockPool
from tritonkv.cache.host_tier import HostTier, host_tier_bytes
from tritonkv.cache.kv_cache_manager import KVCacheManager
from tritonkv.cache.tier_moves import SwapPlan
from tritonkv.engine.requests import SamplingParams, Turn
from tritonkv.sched.scheduler import Scheduler
from tritonkv.sched.sequence import SeqStatus


def make(num_blocks: int, host_blocks: int, budget: int = 64, prefix_caching: bool = True):
    """``prefix_caching`` off: a swapped-out sequence's blocks are never found still cached on
    the device, so its swap-in copies them all (the restore path's tests)."""
    pool = BlockPool.in_process(num_blocks, BS)
    kv = KVCacheManager(pool, owner=0, host=HostTier(host_blocks), enable_prefix_caching=prefix_caching)
    return pool, kv, Scheduler(kv, budget, 8)


def go_idle(seq) -> None:
    seq.status, seq.turn = SeqStatus.IDLE, None


def next_turn(seq, new_tokens, admitted_at) -> None:
    seq.token_ids += new_tokens
    seq.turn = Turn(prompt_ids=list(new_tokens), params=SamplingParams(max_tokens=64), emit=lambda out: None)
    seq.status, seq.admitted_at = SeqStatus.RUNNING, admitted_at


def test_idle_conversation_swaps_out_instead_of_preempting_and_comes_back_without_recompute():
    pool, kv, sched = make(num_blocks=6, host_blocks=4)
    a = running("a", prompt(100, 8), admitted_at=0)
    advance(kv, sched.schedule([a], []))  # a: blocks 0, 1 (both full, registered)
    go_idle(a)
    assert kv.block_table("a") == [0, 1] and a.num_computed == 8
    b = running("b", prompt(200, 16), admitted_at=1)
    advance(kv, sched.schedule([b], [a]))  # b: blocks 2..5, the pool is full
    assert kv.block_table("b") == [2, 3, 4, 5] and pool.counts()["free"] == 0
    assert kv.take_swaps() == SwapPlan()
    # b's decode at position 16 needs a 5th block: idle a swaps out (not preempted)
    plan = sched.schedule([b], [a])
    assert shape(plan) == [("b", 16, 1, True)]
    # a's blocks 0, 1 go to host blocks 0, 1; b's growth then reclaims the cached block 1 (a's
    # chain tail, least recently used), which is demoted as a prefix block to host block 2
    # (read in the same step before b writes it)
    assert kv.take_swaps() == SwapPlan(out_device=[0, 1, 1], out_host=[0, 1, 2])
    assert (sched.num_swap_outs, sched.num_preemptions) == (1, 0)
    assert "a" not in kv and kv.swapped("a") and a.num_computed == 8  # nothing to recompute
    assert kv.host.counts()["used"] == 2 and kv.host.blocks_of("a") == [0, 1]
    assert (kv.host.counts()["cached"], kv.host.counts()["demoted_blocks"]) == (1, 1)
    # a's blocks stay in the prefix index until reused: b took block 1 (a's chain tail, LRU first)
    assert kv.block_table("b") == [2, 3, 4, 5, 1]
    assert pool.refcounts([0, 1]) == [0, 1] and pool.counts()["cached"] == 1
    advance(kv, plan)
    # b ends; a's next turn swaps in ahead of its prefill and computes only the new tokens
    kv.release("b")
    next_turn(a, [7, 7, 7], admitted_at=2)
    plan = sched.schedule([a], [])
    swaps = kv.take_swaps()
    # a's first block is still cached on the device (block 0, registered, unused since): it is
    # taken back by reference, not copied; only its second block (host block 1) is restored,
    # into the free block 1 (b's unfilled tail). a is the step's only work: it runs now and
    # the step waits for that restore (3r)
    assert swaps.restore_host == [1] and swaps.restore_device == [1] and swaps.in_host == []
    assert swaps.wait_restores and not kv.restoring("a")
    # the turn's growth reclaims b's chain tail (5), demoted to host block 0 (a left host
    # blocks 0, 1 at its swap-in)
    assert (swaps.out_device, swaps.out_host) == ([5], [0])
    assert kv.block_table("a") == [0, 1, 5]
    assert shape(plan) == [("a", 8, 4, True)]  # 8 tokens restored: token 8 (sampled) + 3 new
    assert a.turn.cached_tokens == 8
    # host: block 2 (b's growth demoted a's old block 1) and block 0 (5) hold prefix blocks
    assert not kv.swapped("a") and kv.host.counts()["used"] == 0 and kv.host.counts()["cached"] == 2
    stats = kv.host.counts()
    assert (stats["swap_out_blocks"], stats["swap_in_blocks"], stats["swap_in_device_hit_blocks"],
            stats["swap_outs"], stats["swap_ins"]) == (2, 1, 1, 1, 1)
    advance(kv, plan)
    kv.release("a")
    assert pool.counts()["used"] == 0 and kv.host.counts()["used"] == 0


def test_a_full_host_tier_drops_the_least_recently_parked_conversation():
    pool, kv, _ = make(num_blocks=12, host_blocks=4)
    for i, name in enumerate("abc"):
        kv.start(name, prompt(10 * i, 8))
        assert kv.grow(name, 8)
    assert kv.swap_out("a") and kv.swap_out("b")
    assert kv.host.parked() == ["a", "b"] and kv.host.num_free() == 0
    # within the step that parked them, neither may be dropped (their bytes are still in flight)
    assert not kv.swap_out("c") and "c" in kv
    kv.take_swaps()  # the step ran its copies
    assert kv.swap_out("c")  # the tier is full: a (parked first) is dropped, c takes its blocks
    assert kv.host.parked() == ["b", "c"] and kv.host.blocks_of("c") == [0, 1]
    assert not kv.swapped("a") and "a" not in kv  # a recomputes on its next turn
    assert kv.host.counts()["dropped_blocks"] == 2 and kv.host.counts()["dropped"] == 1
    # ``keep`` protects a parked conversation whose turn is waiting to swap in
    kv.start("d", prompt(90, 8))
    assert kv.grow("d", 8)
    kv.take_swaps()
    assert kv.swap_out("d", keep=["b"]) and kv.host.parked() == ["b", "d"]
    kv.start("e", prompt(70, 20))
    assert kv.grow("e", 20)
    assert not kv.swap_out("e")  # 5 blocks: more than the whole tier; it stays (and is preempted)
    assert "e" in kv and kv.host.parked() == ["b", "d"]
    for name in "bde":
        kv.release(name)
    assert pool.counts()["used"] == 0 and kv.host.counts()["used"] == 0


def test_release_frees_both_tiers_and_shared_blocks_keep_their_other_reference():
    pool, kv, _ = make(num_blocks=8, host_blocks=8)
    kv.start("a", prompt(1, 9))
    assert kv.grow("a", 9)
    kv.commit("a", prompt(1, 9))
    cached = kv.start("b", prompt(1, 9))  # shares a's two full blocks
    assert cached == 8 and kv.block_table("b")[:2] == kv.block_table("a")[:2]
    assert kv.grow("b", 9)
    shared = kv.block_table("a")[:2]
    assert kv.swap_out("a")
    assert kv.take_swaps().out_device == [0, 1, 2]
    assert pool.refcounts(shared) == [1, 1]  # b's references remain
    assert kv.host.counts()["used"] == 3
    kv.release("a")  # END while on the host: nothing is copied back
    assert kv.host.counts()["used"] == 0 and kv.take_swaps() == SwapPlan()
    kv.release("b")
    assert pool.counts()["used"] == 0


def test_host_runs_are_contiguous_when_they_can_be():
    tier = HostTier(8)
    assert tier.park("x", None, 3) == [0, 1, 2]
    assert tier.park("y", None, 2) == [3, 4]
    tier.drop("x")
    assert tier.park("z", None, 4) == [0, 1, 2, 5]  # free 0-2, 5-7: no run of 4, the lowest ids
    assert tier.park("w", None, 2) == [6, 7]
    tier.drop("y")
    tier.drop("w")
    assert tier.park("r", None, 2) == [3, 4]  # free 3, 4, 6, 7: the first run
    assert tier.counts() == {"total": 8, "used": 6, "cached": 0, "free": 2, "sequences": 2, "swap_out_blocks": 13,
                             "swap_in_blocks": 0, "swap_in_device_hit_blocks": 0, "swap_outs": 5, "swap_ins": 0, "dropped_blocks": 0, "dropped": 0,
                             "demoted_blocks": 0, "prefix_hit_blocks": 0}


def test_host_tier_counts_and_lowest_ids_follow_a_model_of_its_blocks_under_random_operations():
    """The tier keeps its free count instead of counting (cache/host_tier.py): under random
    parks, unparks, drops, demotions and room-making, every count and every demoted block id
    equals a plain set model's (the lowest free id; parks as in the run rule above)."""
    rng = random.Random(7)
    tier = HostTier(40)
    used: dict = {}  # sequence -> its blocks (the model)
    cached: list[int] = []  # demoted blocks, least recently used first (the model)
    for step in range(3000):
        free = sorted(set(range(40)) - {b for bs in used.values() for b in bs} - set(cached))
        op = rng.random()
        if op < 0.3 and free:
            n = rng.randint(1, min(6, len(free)))
            runs = [free[i:i + n] for i in range(len(free) - n + 1) if free[i + n - 1] - free[i] == n - 1]
            expect = runs[0] if runs else free[:n]
            assert tier.park(step, None, n) == expect
            used[step] = expect
        elif op < 0.5 and used:
            seq = rng.choice(list(used))
            if rng.random() < 0.5:
                assert tier.unpark(seq).host_blocks == used.pop(seq)
            else:
                assert tier.drop(seq)
                used.pop(seq)
        elif op < 0.85:
            got = tier.demote(step, 0, (step,))
            if not free and cached:  # the least recently used cached block makes room
                free = [cached.pop(0)]
            expect = free[0] if free else None
            assert got == expect
            if expect is not None:
                cached.append(expect)
        else:
            n = rng.randint(1, 12)
            dropped = tier.make_room(n)
            if dropped is not None:
                while len(free) < n and cached:
                    free.append(cached.pop(0))
                for seq, _, blocks in dropped:
                    assert used.pop(seq) == blocks
        c = tier.counts()
        in_use = sum(len(bs) for bs in used.values())
        assert (c["used"], c["cached"], c["free"]) == (in_use, len(cached), 40 - in_use - len(cached))
        assert tier.num_free() == int(tier._free.sum())


def test_host_tier_sizing_rules():
    gib = 2**30
    assert host_tier_bytes(0, True, 1, 10 * gib) == 0
    assert host_tier_bytes(2.5, False, 0, gib) == int(2.5 * gib)
    assert host_tier_bytes(-1, False, 0, gib, available=100 * gib) == 0  # CPU: off unless set
    # auto on a GPU server: 40% of the available RAM over the GPUs, at most 4 device pools
    assert host_tier_bytes(-1, True, 8, 100 * gib, available=200 * gib) == 10 * gib
    assert host_tier_bytes(-1, True, 1, gib, available=200 * gib) == 4 * gib


def test_sampled_token_is_not_counted_as_restored():
    """The restored prefix is what was computed: a turn's last sampled token has no KV yet."""
    pool, kv, sched = make(num_blocks=4, host_blocks=4)
    a = running("a", prompt(5, 5), admitted_at=0)
    advance(kv, sched.schedule([a], []))
    assert a.token_ids[-1] == SAMPLED and a.num_computed == 5
    go_idle(a)
    assert kv.swap_out("a") and kv.take_swaps().out_device == [0, 1]
    next_turn(a, [3], admitted_at=1)
    assert shape(sched.schedule([a], [])) == [("a", 5, 2, True)]


def test_a_reclaimed_prefix_block_is_demoted_and_a_later_prompt_loads_it_from_the_host():
    pool, kv, _ = make(num_blocks=3, host_blocks=4)
    first = prompt(40, 9)  # two full blocks + 1 token
    kv.start("a", first)
    assert kv.grow("a", 9) and kv.block_table("a") == [0, 1, 2]
    kv.commit("a", first)
    kv.release("a")  # blocks 0, 1 cached on the device, 2 free
    kv.start("b", prompt(80, 12))
    assert kv.grow("b", 12)  # takes 2, then reclaims 1 then 0 (chain tail first)
    assert kv.take_swaps() == SwapPlan(out_device=[1, 0], out_host=[0, 1])
    assert kv.host.counts()["cached"] == 2 and kv.host.counts()["demoted_blocks"] == 2
    kv.release("b")
    # the same prefix again: a's prefix is only on the host now
    assert kv.start("c", first) == 8  # both blocks loaded, not recomputed
    # prefix block 0 sits in host block 1, block 1 in host block 0 (demoted tail first); b
    # registered nothing, so the load takes free device blocks and demotes nothing
    assert kv.take_swaps() == SwapPlan(in_host=[1, 0], in_device=[0, 1])
    assert kv.block_table("c") == [0, 1]
    assert kv.host.counts()["prefix_hit_blocks"] == 2
    # and they are in the device prefix index again
    kv.release("c")
    assert kv.start("d", first) == 8 and kv.take_swaps() == SwapPlan()
    kv.release("d")


def test_a_block_demoted_in_this_step_is_not_a_host_prefix_hit_until_the_next():
    """Its bytes reach the host row after the step's loads read theirs (ops/kv_swap.py), so
    a prompt in the same step computes it; from the next step it loads."""
    pool = BlockPool.in_process(3, BS)
    kv = KVCacheManager(pool, owner=0, host=HostTier(4))
    first = prompt(40, 9)
    kv.start("a", first)
    kv.grow("a", 9)
    kv.commit("a", first)
    kv.release("a")  # a's two full blocks stay cached on the device
    kv.take_swaps()
    kv.start("b", prompt(80, 12))
    assert kv.grow("b", 12)  # takes every block: a's two are demoted to host rows 0, 1
    kv.release("b")
    assert kv.start("c", first) == 0  # the same step: no hit
    swaps = kv.take_swaps()
    assert (swaps.out_host, swaps.in_host) == ([0, 1], [])
    kv.release("c")
    assert kv.start("d", first) == 8  # the next step: both blocks load from the host
    swaps = kv.take_swaps()
    assert sorted(swaps.in_host) == [0, 1] and len(swaps.in_device) == 2


def test_parking_evicts_cached_host_blocks_before_any_parked_conversation():
    pool, kv, _ = make(num_blocks=8, host_blocks=3)
    assert kv.host.demote(11, 0, (1, 2, 3, 4)) == 0 and kv.host.demote(12, 11, (5, 6, 7, 8)) == 1
    kv.start("a", prompt(1, 8))
    assert kv.grow("a", 8)
    assert kv.swap_out("a") and kv.host.blocks_of("a") == [0, 2]  # the LRU cached block (0) went
    assert kv.host.find(11, 0, (1, 2, 3, 4)) is None and kv.host.find(12, 11, (5, 6, 7, 8)) == 1
    assert kv.host.demote(13, 12, (9, 9, 9, 9)) == 1  # evicts the older cached block, not a
    assert kv.host.parked() == ["a"]
    kv.release("a")
    assert kv.host.counts()["used"] == 0 and kv.host.counts()["cached"] == 1


def park(kv, sched, a, b_tokens: int):
    """``a`` ran a turn and went idle; ``b`` then needs room: a is parked on the host. Returns b."""
    advance(kv, sched.schedule([a], []))
    go_idle(a)
    assert kv.swap_out("a") and kv.take_swaps().out_device == [0, 1]
    b = running("b", prompt(200, b_tokens), admitted_at=1)
    advance(kv, sched.schedule([b], [a]))
    kv.take_swaps()
    return b


def test_a_restore_overlaps_the_other_rows_and_runs_once_its_copies_landed():
    pool, kv, sched = make(num_blocks=8, host_blocks=4, prefix_caching=False)
    a = running("a", prompt(100, 8), admitted_at=0)
    b = park(kv, sched, a, b_tokens=6)  # b decodes on blocks 2, 3 (blocks 0, 1 free: a's old ones)
    next_turn(a, [7, 7, 7], admitted_at=2)
    # a's turn arrives while b decodes: a swaps in (its copies queued), b runs alone this step
    plan = sched.schedule([b, a], [])
    assert shape(plan) == [("b", 6, 1, True)]
    swaps = kv.take_swaps()
    assert swaps.restore_host == [0, 1] and not swaps.wait_restores and swaps.in_host == []
    assert kv.restoring("a") and len(kv.block_table("a")) == 3  # restored table + its turn's block
    advance(kv, plan)
    # not landed yet: b's next step still runs without a, and waits for nothing
    plan = sched.schedule([b, a], [])
    assert shape(plan) == [("b", 7, 1, True)] and not kv.take_swaps()
    advance(kv, plan)
    # landed: a prefills only its new tokens (8 computed + its sampled token + 3), beside b
    kv.restores_landed()
    plan = sched.schedule([b, a], [])
    assert shape(plan) == [("b", 8, 1, True), ("a", 8, 4, True)] and not kv.take_swaps()
    assert a.turn.cached_tokens == 8
    advance(kv, plan)
    kv.release("a")
    kv.release("b")
    assert pool.counts()["used"] == 0 and kv.host.counts()["used"] == 0


def test_a_restoring_sequence_released_makes_the_next_step_wait_for_its_copies():
    """Its blocks go back to the pool while the copies into them may be in flight: nothing may
    write them before those land."""
    pool, kv, sched = make(num_blocks=8, host_blocks=4, prefix_caching=False)
    a = running("a", prompt(100, 8), admitted_at=0)
    b = park(kv, sched, a, b_tokens=6)
    next_turn(a, [7, 7, 7], admitted_at=2)
    advance(kv, sched.schedule([b, a], []))
    assert not kv.take_swaps().wait_restores and kv.restoring("a")
    # its bytes may not be on the device yet: it is never parked again (a gather would read
    # them before the restore wrote them); the caller preempts it instead
    assert not kv.swap_out("a") and kv.restoring("a") and not kv.take_swaps()
    kv.release("a")  # a cancelled mid-restore
    assert not kv.restoring("a") and kv.take_swaps() == SwapPlan(wait_restores=True)
    assert pool.refcounts(kv.block_table("b")) == [1, 1] and pool.counts()["used"] == 2
    kv.release("b")
    assert pool.counts()["used"] == 0 and kv.host.counts()["used"] == 0


def test_an_eviction_that_trims_a_restoring_sequence_makes_its_step_wait_for_the_copies():
    """A sliding window that drops blocks of a sequence whose restore may be in flight: those
    blocks could be handed out and written in the same step, so the step waits for the copies."""
    from tritonkv.cache.eviction.window import SlidingWindow

    pool = BlockPool.in_process(8, BS)
    kv = KVCacheManager(pool, owner=0, host=HostTier(8), policy=SlidingWindow(BS, window=8))
    tokens = prompt(100, 8)
    kv.start("a", tokens, ())
    assert kv.grow("a", 8)
    kv.commit("a", tokens)
    assert kv.swap_out("a") and kv.take_swaps().out_device == [0, 1]
    assert kv.swap_in("a") and kv.restoring("a")
    assert kv.take_swaps().restore_host == [0, 1]
    assert kv.evict("a", 8)  # the window still holds positions 0..7: nothing to drop, no wait
    assert not kv.take_swaps()
    assert kv.evict("a", 13)  # the query at 13 sees 6..13: block 0 (positions 0..3) goes
    assert len(kv.block_table("a")) == 1 and kv.take_swaps() == SwapPlan(wait_restores=True)
    kv.restores_landed()
    assert kv.evict("a", 17) and not kv.take_swaps()  # landed: evicting waits for nothing
    kv.release("a")
    assert pool.counts()["used"] == 0 and kv.host.counts()["used"] == 0


def test_a_swap_in_takes_back_the_blocks_the_device_still_caches_and_copies_the_rest():
    """Nothing reclaimed a's registered blocks while it was parked: its next turn takes them
    back by reference (no copy) and restores only its unregistered tail block from the host."""
    pool, kv, sched = make(num_blocks=16, host_blocks=8)
    a = running("a", prompt(100, 10), admitted_at=0)
    advance(kv, sched.schedule([a], []))  # a: blocks 0, 1 full (registered), 2 holds 2 tokens
    go_idle(a)
    assert kv.block_table("a") == [0, 1, 2] and a.token_ids[-1] == SAMPLED
    assert kv.swap_out("a") and kv.take_swaps().out_device == [0, 1, 2]
    assert kv.host.blocks_of("a") == [0, 1, 2] and pool.refcounts([0, 1, 2]) == [0, 0, 0]
    assert pool.counts()["cached"] == 2  # blocks 0, 1 stay in the prefix index; 2 is free
    next_turn(a, [7, 7], admitted_at=1)  # 13 tokens: 10 computed, the sampled one + 2 new to prefill
    plan = sched.schedule([a], [])
    swaps = kv.take_swaps()
    # 0, 1 taken back; the tail (host block 2) restored into the lowest free block (2), and
    # a is the step's only work, so the step waits for that one copy
    assert (swaps.restore_host, swaps.restore_device, swaps.wait_restores) == ([2], [2], True)
    assert swaps.out_device == [] and swaps.in_host == []
    assert kv.block_table("a") == [0, 1, 2, 3] and pool.refcounts([0, 1, 2, 3]) == [1, 1, 1, 1]
    assert shape(plan) == [("a", 10, 3, True)] and a.turn.cached_tokens == 10
    stats = kv.host.counts()
    assert (stats["swap_in_blocks"], stats["swap_in_device_hit_blocks"], stats["used"]) == (1, 2, 0)
    # a swap-in's reuse is no prefix-cache hit in the pool's stats (nothing was looked up for a prompt)
    assert pool.counts()["prefix_hit_blocks"] == 0
    advance(kv, plan)
    kv.release("a")
    assert pool.counts()["used"] == 0 and kv.host.counts()["used"] == 0


def test_a_swap_in_whose_blocks_are_all_still_cached_copies_nothing_and_runs_at_once():
    pool, kv, sched = make(num_blocks=16, host_blocks=8)
    b = running("b", prompt(300, 3), admitted_at=0)
    a = running("a", prompt(100, 7), admitted_at=0)
    advance(kv, sched.schedule([a, b], []))  # a: 7 tokens + the sampled one = 2 full blocks (0, 1)
    advance(kv, sched.schedule([a, b], []))  # a's 8th token computed: block 1 registered
    go_idle(a)
    assert kv.block_table("a") == [0, 1] and a.num_computed == 8 == len(a.token_ids) - 1
    assert kv.swap_out("a") and kv.take_swaps().out_device == [0, 1]
    next_turn(a, [5, 6, 7], admitted_at=1)
    plan = sched.schedule([b, a], [])
    swaps = kv.take_swaps()
    assert swaps == SwapPlan()  # nothing copied, nothing waited
    assert not kv.restoring("a") and kv.block_table("a")[:2] == [0, 1]
    # not restoring: a prefills its new tokens in this very step, beside b's decode
    assert shape(plan) == [("b", 4, 1, True), ("a", 8, 4, True)]
    assert kv.host.counts()["swap_in_device_hit_blocks"] == 2 and kv.host.counts()["swap_in_blocks"] == 0
    advance(kv, plan)
    kv.release("a")
    kv.release("b")
    assert pool.counts()["used"] == 0 and kv.host.counts()["used"] == 0


def test_a_swap_in_that_cannot_get_its_other_blocks_gives_back_the_cached_ones():
    pool, kv, _ = make(num_blocks=4, host_blocks=8)
    kv.start("a", prompt(100, 10))
    assert kv.grow("a", 10)
    kv.commit("a", prompt(100, 10))  # blocks 0, 1 registered, 2 partial
    assert kv.swap_out("a")
    kv.take_swaps()
    kv.start("c", prompt(500, 8))  # c takes the free blocks 2, 3: a's tail has no room now
    assert kv.grow("c", 8) and kv.block_table("c") == [2, 3]
    stamps = pool.arrays.last_used[[0, 1]].tolist()
    assert not kv.swap_in("a", prompt(100, 10))  # blocks 0, 1 found, but no block for the tail
    assert kv.swapped("a") and pool.refcounts([0, 1]) == [0, 0] and pool.counts()["cached"] == 2
    assert pool.arrays.last_used[[0, 1]].tolist() == stamps  # the reclaim order is as it was
    assert kv.take_swaps() == SwapPlan()
    kv.release("c")
    assert kv.swap_in("a", prompt(100, 10)) and kv.block_table("a")[:2] == [0, 1]
    kv.release("a")
    assert pool.counts()["used"] == 0 and kv.host.counts()["used"] == 0


def test_a_window_evicted_sequence_copies_every_block_back():
    """Its kept blocks are no longer its original blocks from the first on: the cached blocks
    of its evicted originals must not be taken back into the kept ones' places."""
    from tritonkv.cache.eviction.window import SlidingWindow

    pool = BlockPool.in_process(16, BS)
    kv = KVCacheManager(pool, owner=0, host=HostTier(16), policy=SlidingWindow(BS, window=8))
    tokens = prompt(100, 16)
    kv.start("a", tokens)
    assert kv.grow("a", 16)
    kv.commit("a", tokens)
    assert kv.evict("a", 16) and kv.block_table("a") == [2, 3]  # 0, 1 left the window, still cached
    assert pool.counts()["cached"] == 2
    assert kv.swap_out("a")
    kv.take_swaps()
    assert kv.swap_in("a", tokens + [5])
    assert kv.host.counts()["swap_in_device_hit_blocks"] == 0 and kv.take_swaps().restore_host == [0, 1]
    assert pool.refcounts([0, 1]) == [0, 0]
    kv.release("a")
    assert pool.counts()["used"] == 0 and kv.host.counts()["used"] == 0
