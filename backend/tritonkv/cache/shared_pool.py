"""One ``BlockPool`` shared by every process on a device: its arrays live in the pool file.

The pool's files and their format are in ``pool_file``, the lock in ``process_lock``, the
tools that inspect or remove a pool without attaching in ``pool_admin``.

Rules:
- The first process creates the pool, later ones attach (same geometry and fingerprint, or
  a clear error); the last attachment to close removes every file of the pool.
- Every pool operation holds the pool's ``ProcessLock``.
- Every attachment claims an owner slot (pid + process start time) and tags its references
  with it. A slot whose process is dead (or a zombie, or whose pid was reused) is reclaimed:
  its references are dropped, its slot freed. This runs on attach, when an allocation finds
  too few blocks, and on a timer.
- A process that dies inside a critical section leaves ``holder_pid`` set; the next lock
  holder rebuilds ``refcount`` from ``owner_refs`` (the source of truth) and reclaims it.
- A pool whose file exists but has no live owner is stale (everyone crashed): it is
  recreated, not reused.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable

from tritonkv.cache.block_pool import BlockPool, PoolExhausted
from tritonkv.cache.pool_admin import remove_pool_files
from tritonkv.cache.pool_file import NAME_RE, PoolFile, create_pool_file, fingerprint, open_pool_file, pool_path
from tritonkv.cache.process_lock import ProcessLock, open_locked, process_alive, process_start_time

log = logging.getLogger("tritonkv.cache")

RECLAIM_PERIOD_S = 1.0


class PoolMismatch(ValueError):
    """The pool under this name was made for another model or geometry."""


class SharedBlockPool(BlockPool):
    """A ``BlockPool`` over a shared-memory file; ``owner`` is this attachment's slot.

    Open with ``SharedBlockPool.open``; ``close`` (idempotent) drops this attachment's
    references and, when it was the last live one, removes the pool's files."""

    def __init__(self, name: str, pf: PoolFile, lock: ProcessLock, owner: int, created: bool,
                 reclaim_period_s: float | None):
        super().__init__(pf.arrays, lock)
        self.name = name
        self.owner = owner
        self.created = created
        self._pf = pf
        self._pid = os.getpid()
        self._closed = False
        lock.on_acquire = self._on_acquire
        lock.on_release = self._on_release
        self._stop = threading.Event()
        self._timer = None
        if reclaim_period_s:
            self._timer = threading.Thread(target=self._reclaim_loop, args=(reclaim_period_s,),
                                           name=f"tritonkv-pool-{name}", daemon=True)
            self._timer.start()

    # -- open / close ------------------------------------------------------------------------
    @classmethod
    def open(cls, name: str, num_blocks: int, block_size: int, *, description: str = "",
             max_owners: int = 32, reclaim_period_s: float | None = RECLAIM_PERIOD_S,
             on_open: Callable[["SharedBlockPool"], None] | None = None) -> "SharedBlockPool":
        """Create the pool ``name`` or attach to it. ``description`` says what the blocks hold
        (model, dtype, KV shape); attachers must match it and the geometry exactly.
        ``on_open(pool)`` runs before the pool lock is first released (``pool.created`` tells
        whether this call made the pool), e.g. to create or attach companion storage."""
        if not NAME_RE.match(name):
            raise ValueError(f"pool name {name!r} must use only letters, digits, '_' and '-'")
        if num_blocks <= 0 or block_size <= 0 or max_owners <= 0:
            raise ValueError("num_blocks, block_size and max_owners must be > 0")
        fp = fingerprint(description or f"{num_blocks}x{block_size}")
        lock = ProcessLock(open_locked(pool_path(name, "lock")), held=True)
        pf = pool = None
        try:
            pf, created = cls._create_or_attach(name, num_blocks, block_size, max_owners, fp, description)
            owner = cls._claim_slot(pf, name)
            pool = cls(name, pf, lock, owner, created, reclaim_period_s)
            pool._on_acquire()  # repair if a process died holding the lock
            if on_open is not None:
                on_open(pool)
        except BaseException:
            if pool is not None:
                pool._close_locked()
            elif pf is not None:
                pf.close()
            lock.__exit__(None, None, None)
            lock.close()
            raise
        lock.__exit__(None, None, None)
        return pool

    @staticmethod
    def _create_or_attach(name, num_blocks, block_size, max_owners, fp, description):
        path = pool_path(name, "pool")
        pf = open_pool_file(path)
        if pf is not None:
            live = sorted(set(pf.live_owner_pids()))
            if live:
                wanted = (num_blocks, block_size, max_owners, fp)
                have = tuple(pf.header(f) for f in ("num_blocks", "block_size", "max_owners", "fingerprint"))
                if have != wanted:
                    msg = (f"KV pool {name!r} ({path}) is in use by pids {live} with "
                           f"{have[0]} blocks x {have[1]} tokens, {have[2]} owner slots, holding "
                           f"[{pf.description}]; this instance wants {num_blocks} blocks x {block_size} "
                           f"tokens, {max_owners} owner slots, holding [{description}] — give the "
                           "models identical checkpoint/dtype/block_size/num_blocks "
                           "(kv_cache_memory_mb) settings or different pool_name parameters")
                    pf.close()
                    raise PoolMismatch(msg)
                return pf, False
            pf.close()
        if os.path.exists(path):
            log.warning("KV pool %r: %s has no live owner (left by a crash); recreating it", name, path)
        remove_pool_files(name, keep_lock=True)
        return create_pool_file(path, num_blocks, block_size, max_owners, fp, description), True

    @staticmethod
    def _claim_slot(pf: PoolFile, name: str) -> int:
        me = os.getpid()
        start = process_start_time(me) or 0
        for slot in range(len(pf.owner_pid)):
            pid = int(pf.owner_pid[slot])
            if pid and not process_alive(pid, int(pf.owner_start[slot])):
                _reclaim_slot(pf, slot)
            if not pf.owner_pid[slot]:
                pf.owner_pid[slot] = me
                pf.owner_start[slot] = start
                return slot
        raise RuntimeError(f"KV pool {name!r}: all {len(pf.owner_pid)} owner slots are held by live "
                           "processes; run fewer instances per device or raise max_owners")

    def close(self) -> None:
        """Drop this attachment (its references, its slot); the last one out removes the files."""
        if self._closed or os.getpid() != self._pid:
            return
        self._stop.set()
        with self.lock:
            self._close_locked()
        self.lock.close()
        if self._timer is not None and self._timer is not threading.current_thread():
            self._timer.join(timeout=5)

    def _close_locked(self) -> None:
        if self._closed:
            return
        self._closed = True
        pf = self._pf
        _reclaim_slot(pf, self.owner)
        if not pf.live_owner_pids():
            remove_pool_files(self.name, keep_lock=False)
        pf.set_header("holder_pid", 0)
        # the views stay valid (the mapping lives until the process ends); only stop using it
        self.lock.on_release = lambda: None
        self.lock.on_acquire = self._refuse

    def _refuse(self):
        raise RuntimeError(f"KV pool {self.name!r} was closed by this process")

    # -- crash handling ----------------------------------------------------------------------
    def _on_acquire(self) -> None:
        pf = self._pf
        holder = pf.header("holder_pid")
        if holder and holder != os.getpid():
            # the last holder died inside a critical section: owner_refs is the truth
            log.warning("KV pool %r: pid %d died holding the pool lock; repairing refcounts", self.name, holder)
            self.arrays.refcount[:] = self.arrays.owner_refs.sum(axis=0)
            self._reclaim_dead_locked()
        pf.set_header("holder_pid", os.getpid())

    def _on_release(self) -> None:
        self._pf.set_header("holder_pid", 0)

    def reclaim_dead_owners(self) -> int:
        """Drop every reference held by attachments whose process is gone. Returns how many."""
        with self.lock:
            return self._reclaim_dead_locked()

    def _reclaim_dead_locked(self) -> int:
        pf, dropped = self._pf, 0
        for slot in range(len(pf.owner_pid)):
            pid = int(pf.owner_pid[slot])
            if pid and slot != self.owner and not process_alive(pid, int(pf.owner_start[slot])):
                n = _reclaim_slot(pf, slot)
                log.warning("KV pool %r: owner slot %d (pid %d) is dead; reclaimed %d block references",
                            self.name, slot, pid, n)
                dropped += n
        return dropped

    def _reclaim_loop(self, period_s: float) -> None:
        while not self._stop.wait(period_s):
            try:
                self.reclaim_dead_owners()
            except Exception:
                if not self._closed:
                    log.exception("KV pool %r: reclaiming dead owners failed", self.name)

    # -- BlockPool with a retry after reclaiming --------------------------------------------
    def allocate(self, n: int, owner: int) -> list[int]:
        with self.lock:
            try:
                return super().allocate(n, owner)
            except PoolExhausted:
                if not self._reclaim_dead_locked():
                    raise
                return super().allocate(n, owner)

    def counts(self) -> dict[str, int]:
        with self.lock:
            counts = super().counts()
            counts["owners"] = int((self._pf.owner_pid != 0).sum())
            return counts

    def owners(self) -> dict[int, int]:
        """slot -> pid of every claimed owner slot."""
        with self.lock:
            return {i: int(p) for i, p in enumerate(self._pf.owner_pid) if p}

    def companion_path(self, suffix: str) -> str:
        """Path of a file that lives and dies with this pool (removed by the last one out)."""
        if not re.match(r"^[a-z0-9_]+$", suffix) or suffix in ("lock", "pool"):
            raise ValueError(f"bad companion suffix {suffix!r}")
        return pool_path(self.name, suffix)


def _reclaim_slot(pf: PoolFile, slot: int) -> int:
    """Drop all references of ``slot`` and free it (caller holds the lock)."""
    refs = pf.arrays.owner_refs[slot]
    n = int(refs.sum())
    pf.arrays.refcount -= refs
    refs[:] = 0
    pf.owner_pid[slot] = 0
    pf.owner_start[slot] = 0
    return n
