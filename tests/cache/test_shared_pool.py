"""One pool, several processes: invariants under random load, SIGKILL reclaim, attach rules,
the admin tools that read or remove a pool without attaching."""

import multiprocessing as mp
import os
import signal

import pytest

from polling import wait_until
from pool_workers import BS, attach_only, hammer, hold_and_wait
from tritonkv.cache.block_hash import hash_full_blocks
from tritonkv.cache.pool_admin import device_pools, pool_snapshot, remove_if_stale
from tritonkv.cache.pool_file import pool_path
from tritonkv.cache.shared_pool import PoolMismatch, SharedBlockPool

CTX = mp.get_context("spawn")  # no inherited locks or mappings: each worker attaches by name
JOIN_S = 60


@pytest.fixture
def procs():
    """Started worker processes; any still alive at the end (a failing test) are killed."""
    started = []
    yield started
    for p in started:
        if p.is_alive():
            p.kill()
        p.join(5)


def start(procs, target, *args):
    p = CTX.Process(target=target, args=args, daemon=True)
    p.start()
    procs.append(p)
    return p


def open_pool(name, num_blocks=64, **kw):
    return SharedBlockPool.open(name, num_blocks, BS, description="hammer", reclaim_period_s=None, **kw)


def assert_consistent(pool):
    with pool.lock:
        assert (pool.arrays.refcount == pool.arrays.owner_refs.sum(axis=0)).all()
        assert (pool.arrays.refcount >= 0).all()


def test_workers_hammering_one_pool_keep_the_invariants_and_leak_nothing(pool_name, procs):
    parent = open_pool(pool_name, 48)  # small: allocations evict and sometimes fail
    results = CTX.Queue()
    for seed in range(4):
        start(procs, hammer, pool_name, 48, seed, 400, results)
    outcomes = [results.get(timeout=JOIN_S) for _ in procs]
    for p in procs:
        p.join(JOIN_S)
        assert p.exitcode == 0
    assert [o[0] for o in outcomes] == ["ok"] * 4, outcomes
    assert sum(o[2].get("hit_blocks", 0) for o in outcomes) > 0  # blocks were shared across workers
    c = parent.counts()
    assert c["used"] == 0 and c["owners"] == 1
    assert parent.arrays.owner_refs.sum() == 0
    assert_consistent(parent)
    parent.close()
    assert not os.path.exists(pool_path(pool_name, "pool"))  # last one out removed the files


@pytest.mark.parametrize("mode", ["holding", "in_lock"])
def test_killed_worker_references_are_reclaimed(pool_name, procs, mode):
    parent = open_pool(pool_name, 16)
    mine = parent.allocate(1, parent.owner)
    ready, results = CTX.Event(), CTX.Queue()
    p = start(procs, hold_and_wait, pool_name, 16, mode, ready, results)
    owner, chain, more = results.get(timeout=JOIN_S)
    assert ready.wait(JOIN_S)
    if mode == "holding":  # ("in_lock": the worker holds the pool lock until it dies)
        assert parent.owners() == {parent.owner: os.getpid(), owner: p.pid}
    os.kill(p.pid, signal.SIGKILL)
    p.join(JOIN_S)
    if mode == "in_lock":
        # the kernel dropped its flock; the next holder repairs the half-done update
        assert parent.counts()["used"] == 1
    else:
        assert parent.counts()["used"] == 1 + 3 + 2
        assert parent.reclaim_dead_owners() == 3 + 2 * 2
    assert_consistent(parent)
    c = parent.counts()
    assert (c["used"], c["cached"], c["owners"]) == (1, 3, 1)
    assert parent.arrays.refcount[mine].tolist() == [1]
    # the dead worker's registered chain is still a prefix hit for the survivor
    tokens = list(range(12))
    assert parent.acquire_cached_prefix(hash_full_blocks(tokens, BS), tokens, parent.owner) == chain
    # and its slot is reused by the next process that attaches
    again = open_pool(pool_name, 16)
    assert again.owner == owner
    again.close()
    parent.close()


def test_timer_reclaims_a_killed_zombie_without_any_call(pool_name, procs):
    parent = SharedBlockPool.open(pool_name, 16, BS, description="hammer", reclaim_period_s=0.1)
    ready, results = CTX.Event(), CTX.Queue()
    p = start(procs, hold_and_wait, pool_name, 16, "holding", ready, results)
    results.get(timeout=JOIN_S)
    assert ready.wait(JOIN_S)
    assert parent.counts()["used"] == 5
    os.kill(p.pid, signal.SIGKILL)  # not joined yet: a zombie still has its pid
    assert wait_until(lambda: parent.counts()["used"] == 0, 10)
    p.join(JOIN_S)
    parent.close()


def test_attach_with_other_geometry_fails_clearly(pool_name):
    pool = SharedBlockPool.open(pool_name, 16, BS, description="model A fp32", reclaim_period_s=None)
    with pytest.raises(PoolMismatch, match=r"16 blocks x 4 tokens.*wants 32 blocks x 4 tokens"):
        SharedBlockPool.open(pool_name, 32, BS, description="model A fp32", reclaim_period_s=None)
    with pytest.raises(PoolMismatch, match=r"holding \[model A fp32\].*holding \[model B bf16\]"):
        SharedBlockPool.open(pool_name, 16, BS, description="model B bf16", reclaim_period_s=None)
    with pytest.raises(ValueError, match="letters, digits"):
        SharedBlockPool.open("bad/name", 16, BS)
    assert pool.counts()["owners"] == 1
    pool.close()


def test_pool_left_by_dead_processes_is_recreated(pool_name, procs):
    ready = CTX.Event()
    p = start(procs, attach_only, pool_name, 16, ready)
    assert ready.wait(JOIN_S)
    os.kill(p.pid, signal.SIGKILL)
    p.join(JOIN_S)
    assert os.path.exists(pool_path(pool_name, "pool"))  # nobody was left to clean up
    # a pool with no live owner is stale: recreated, even with another geometry
    pool = SharedBlockPool.open(pool_name, 32, BS, description="other", reclaim_period_s=None)
    assert pool.created and pool.num_blocks == 32 and pool.owner == 0
    pool.close()
    assert not os.path.exists(pool_path(pool_name, "lock"))


def test_owner_slots_run_out_with_a_clear_message(pool_name):
    pools = [open_pool(pool_name, 8, max_owners=2) for _ in range(2)]
    with pytest.raises(RuntimeError, match="all 2 owner slots"):
        open_pool(pool_name, 8, max_owners=2)
    pools[0].close()
    third = open_pool(pool_name, 8, max_owners=2)
    assert third.owner == 0
    for p in (third, pools[1]):
        p.close()


def test_closed_attachment_refuses_use(pool_name):
    pool = open_pool(pool_name, 8)
    pool.close()
    pool.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        pool.allocate(1, pool.owner)


def test_remove_if_stale_keeps_a_live_pool_and_removes_a_dead_one(pool_name, procs):
    ready, results = CTX.Event(), CTX.Queue()
    p = start(procs, hold_and_wait, pool_name, 16, "holding", ready, results)
    results.get(timeout=JOIN_S)
    assert ready.wait(JOIN_S)
    assert remove_if_stale(pool_name) is False
    snap = pool_snapshot(pool_name)
    assert (snap["total"], snap["used"], snap["cached"], snap["free"]) == (16, 5, 0, 11)
    assert snap["refcounts_consistent"] and snap["owner_pids"] == snap["live_owner_pids"] == [p.pid]
    os.kill(p.pid, signal.SIGKILL)
    p.join(JOIN_S)
    assert pool_snapshot(pool_name)["live_owner_pids"] == []
    assert remove_if_stale(pool_name) is True
    assert pool_snapshot(pool_name) is None
    assert not os.path.exists(pool_path(pool_name, "pool")) and not os.path.exists(pool_path(pool_name, "lock"))


def test_device_pools_lists_the_pools_of_one_pool_name(pool_name):
    names = [f"{pool_name}-cuda1", f"{pool_name}-cpu0", f"{pool_name}-x-cpu0", pool_name]
    pools = [open_pool(name, 8) for name in names]
    try:
        assert device_pools(pool_name) == [f"{pool_name}-cpu0", f"{pool_name}-cuda1"]
    finally:
        for pool in pools:
            pool.close()
    assert device_pools(pool_name) == []
