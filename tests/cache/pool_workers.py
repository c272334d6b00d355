"""Worker processes for the multi-process pool tests (spawned, so kept importable and small)."""

from __future__ import annotations

import os
import random
import time
from collections import Counter

import numpy as np

from tritonkv.cache.block_hash import NO_HASH, hash_full_blocks
from tritonkv.cache.block_pool import PoolExhausted
from tritonkv.cache.shared_pool import SharedBlockPool

BS = 4
VOCAB = 3  # tiny vocabulary: prompts share prefixes across workers often


def check_invariants(pool: SharedBlockPool, held: Counter) -> None:
    """Under the pool lock: refcounts equal the owners' references, this worker's row equals
    what it thinks it holds, and no block is referenced while counted free or cached."""
    with pool.lock:
        a = pool.arrays
        assert (a.refcount == a.owner_refs.sum(axis=0)).all(), "refcount != sum of owner references"
        assert (a.owner_refs >= 0).all() and (a.refcount >= 0).all()
        mine = np.zeros(pool.num_blocks, np.int64)
        for b, n in held.items():
            mine[b] = n
        assert (a.owner_refs[pool.owner] == mine).all(), "owner row != this worker's live references"
        c = pool.counts()
        assert c["used"] == int((a.refcount > 0).sum())
        assert c["used"] + c["cached"] + c["free"] == pool.num_blocks


def hammer(name: str, num_blocks: int, seed: int, iterations: int, results) -> None:
    """Allocate / share (prefix hits) / register / release at random; report what happened."""
    rng = random.Random(seed)
    pool = SharedBlockPool.open(name, num_blocks, BS, description="hammer", reclaim_period_s=None)
    held: Counter = Counter()
    seqs = []  # (blocks, registered?)
    stats = Counter()
    try:
        for i in range(iterations):
            op = rng.random()
            if op < 0.45 and len(seqs) < 6:
                tokens = [rng.randrange(VOCAB) for _ in range(BS * rng.randint(1, 4))]
                hashes = hash_full_blocks(tokens, BS)
                blocks = pool.acquire_cached_prefix(hashes, tokens, pool.owner)
                stats["hit_blocks"] += len(blocks)
                try:
                    blocks += pool.allocate(len(hashes) - len(blocks), pool.owner) if len(hashes) > len(blocks) else []
                except PoolExhausted:
                    stats["exhausted"] += 1
                held.update(blocks)
                parent = NO_HASH
                for j, h in enumerate(hashes[:len(blocks)]):
                    pool.register(blocks[j], h, parent, tokens[j * BS:(j + 1) * BS])
                    parent = h
                seqs.append(blocks)
            elif op < 0.6 and seqs:
                blocks = rng.choice(seqs)  # a second reference (fork of a sequence)
                pool.take_ref(blocks, pool.owner)
                held.update(blocks)
                seqs.append(list(blocks))
            elif seqs:
                blocks = seqs.pop(rng.randrange(len(seqs)))
                pool.release(blocks, pool.owner)
                held.subtract(blocks)
                held += Counter()  # drop zero counts
            if i % 25 == 0:
                check_invariants(pool, held)
        for blocks in seqs:
            pool.release(blocks, pool.owner)
            held.subtract(blocks)
        held += Counter()
        check_invariants(pool, held)
        results.put(("ok", seed, dict(stats)))
    except BaseException as exc:  # the parent asserts on this
        results.put(("error", seed, repr(exc)))
        raise
    finally:
        pool.close()


def hold_and_wait(name: str, num_blocks: int, mode: str, ready, results) -> None:
    """Take references, register one chain, tell the parent, then wait to be SIGKILLed.
    ``mode`` "in_lock": die inside a critical section after a half-done update."""
    pool = SharedBlockPool.open(name, num_blocks, BS, description="hammer", reclaim_period_s=None)
    tokens = list(range(12))
    blocks = pool.allocate(3, pool.owner)
    parent = NO_HASH
    for j, h in enumerate(hash_full_blocks(tokens, BS)):
        pool.register(blocks[j], h, parent, tokens[j * BS:(j + 1) * BS])
        parent = h
    more = pool.allocate(2, pool.owner)
    pool.take_ref(more, pool.owner)
    results.put((pool.owner, blocks, more))
    if mode == "in_lock":
        with pool.lock:
            pool.arrays.refcount[more[0]] += 1  # half of a _take: owner_refs not yet updated
            ready.set()
            time.sleep(30)  # bounded: a failing test must not hang on the lock
    ready.set()
    time.sleep(30)  # bounded: a failing test must not hang on the lock


def attach_only(name: str, num_blocks: int, ready) -> None:
    SharedBlockPool.open(name, num_blocks, BS, description="hammer", reclaim_period_s=None)
    ready.set()
    time.sleep(30)  # bounded: a failing test must not hang on the lock


def pid() -> int:
    return os.getpid()
