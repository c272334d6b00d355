"""One ``BlockPool`` shared by every process on a device: arrays in a shared-memory file.

Files (all in ``shm_dir()``, default /dev/shm; a pool name is ``[A-Za-z0-9_-]+``):
    tritonkv-<name>.lock   flock'd around every pool operation (the kernel drops it when the
                           holder dies, so a killed process never leaves it held)
    tritonkv-<name>.pool   header, owner table, ``PoolArrays``
    tritonkv-<name>.<x>    companions (KV storage, weights) made by whoever opens the pool

Rules:
- The first process creates the pool, later ones attach (same geometry and fingerprint, or
  a clear error); the last attachment to close removes every file of the pool.
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

import errno
import fcntl
import glob
import hashlib
import logging
import mmap
import os
import re
import threading
import time
from collections.abc import Callable

import numpy as np

from tritonkv.cache.block_pool import BlockPool, PoolArrays, PoolExhausted

log = logging.getLogger("tritonkv.cache")

MAGIC = 0x7472_6B76_706F_6F6C  # "trkvpool"
VERSION = 1
HEADER_FIELDS = ("magic", "version", "num_blocks", "block_size", "max_owners", "fingerprint",
                 "holder_pid", "ready", "creator_pid")
DESC_BYTES = 512
ALIGN = 64
RECLAIM_PERIOD_S = 1.0
NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")


class PoolMismatch(ValueError):
    """The pool under this name was made for another model or geometry."""


def shm_dir() -> str:
    """Where pool files live: $TRITONKV_SHM_DIR, else /dev/shm, else the temp directory."""
    env = os.environ.get("TRITONKV_SHM_DIR")
    if env:
        return env
    if os.path.isdir("/dev/shm"):
        return "/dev/shm"
    import tempfile

    return tempfile.gettempdir()


def pool_path(name: str, suffix: str) -> str:
    return os.path.join(shm_dir(), f"tritonkv-{name}.{suffix}")


def fingerprint(description: str) -> int:
    """A stable int64 for 'what this pool holds' (model, dtype, KV shape)."""
    return int.from_bytes(hashlib.blake2b(description.encode(), digest_size=8).digest(), "little") >> 1


def _proc_start_time(pid: int) -> int | None:
    """Start time (clock ticks since boot) of a live, non-zombie process; None if dead."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except FileNotFoundError:
        return None
    except OSError:  # no /proc: fall back to signal 0
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return 0
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def process_alive(pid: int, start_time: int) -> bool:
    if pid <= 0:
        return False
    now = _proc_start_time(pid)
    return now is not None and (start_time == 0 or now == 0 or now == start_time)


def _layout(num_blocks: int, block_size: int, max_owners: int) -> tuple[dict, int]:
    """name -> (offset, shape, dtype) of every array in the pool file, and the file size."""
    fields = {"header": ((len(HEADER_FIELDS),), np.int64), "desc": ((DESC_BYTES,), np.uint8),
              "owner_pid": ((max_owners,), np.int64), "owner_start": ((max_owners,), np.int64),
              **PoolArrays.layout(num_blocks, block_size, max_owners)}
    out, offset = {}, 0
    for name, (shape, dtype) in fields.items():
        out[name] = (offset, shape, dtype)
        offset += -(-int(np.prod(shape)) * np.dtype(dtype).itemsize // ALIGN) * ALIGN
    return out, offset


class _PoolFile:
    """The mapped pool file: header, owner table and the pool's arrays."""

    def __init__(self, fd: int, size: int, num_blocks: int, block_size: int, max_owners: int):
        self.mm = mmap.mmap(fd, size)
        layout, _ = _layout(num_blocks, block_size, max_owners)
        self.views = {name: np.frombuffer(self.mm, dtype, int(np.prod(shape)), off).reshape(shape)
                      for name, (off, shape, dtype) in layout.items()}
        self.header = self.views["header"]
        self.owner_pid = self.views["owner_pid"]
        self.owner_start = self.views["owner_start"]
        self.arrays = PoolArrays(**{k: self.views[k] for k in PoolArrays.layout(1, 1, 1)})

    def h(self, field: str) -> int:
        return int(self.header[HEADER_FIELDS.index(field)])

    def set_h(self, field: str, value: int) -> None:
        self.header[HEADER_FIELDS.index(field)] = value

    def live_owner_pids(self) -> list[int]:
        """Pids of the owner slots whose process (same start time) is still running."""
        return [int(p) for p, s in zip(self.owner_pid, self.owner_start)
                if p and process_alive(int(p), int(s))]

    @property
    def description(self) -> str:
        return bytes(self.views["desc"]).rstrip(b"\0").decode(errors="replace")

    def close(self) -> None:
        self.views = self.header = self.owner_pid = self.owner_start = self.arrays = None
        try:
            self.mm.close()
        except BufferError:  # a caller still holds a view; the mapping goes with the process
            pass


def _map_pool_file(fd: int) -> _PoolFile | None:
    """The pool file open on ``fd``, mapped; None if it is not a valid, ready pool file."""
    geometry = _read_geometry(fd)
    return None if geometry is None else _PoolFile(fd, os.fstat(fd).st_size, *geometry)


def _read_geometry(fd: int) -> tuple[int, int, int] | None:
    """(num_blocks, block_size, max_owners) from a valid pool file, else None."""
    head = os.pread(fd, 8 * len(HEADER_FIELDS), 0)
    if len(head) < 8 * len(HEADER_FIELDS):
        return None
    h = np.frombuffer(head, np.int64)
    if h[0] != MAGIC or h[1] != VERSION or not h[HEADER_FIELDS.index("ready")]:
        return None
    nb, bs, mo = (int(h[HEADER_FIELDS.index(f)]) for f in ("num_blocks", "block_size", "max_owners"))
    if _layout(nb, bs, mo)[1] > os.fstat(fd).st_size:
        return None
    return nb, bs, mo


class ProcessLock:
    """Reentrant in a process (an RLock), exclusive across processes (flock on the lock file).

    flock belongs to the open file description, so it cannot tell this process's threads
    apart: the RLock does that; the depth counter makes the flock taken once per outermost
    ``with``. ``on_acquire``/``on_release`` run at the outermost level, flock held."""

    def __init__(self, fd: int, held: bool = False):
        self.fd = fd
        self._rlock = threading.RLock()
        self._depth = 0
        if held:  # the caller already holds the flock on ``fd``
            self._rlock.acquire()
            self._depth = 1
        self.on_acquire: Callable[[], None] | None = None
        self.on_release: Callable[[], None] | None = None

    def __enter__(self):
        self._rlock.acquire()
        if self._depth == 0:
            if self.fd < 0:
                self._rlock.release()
                raise RuntimeError("the KV pool was closed by this process")
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX)
                if self.on_acquire is not None:
                    self.on_acquire()
            except BaseException:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
                self._rlock.release()
                raise
        self._depth += 1
        return self

    def __exit__(self, *exc):
        self._depth -= 1
        try:
            if self._depth == 0:
                try:
                    if self.on_release is not None:
                        self.on_release()
                finally:
                    fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            self._rlock.release()
        return False

    def close(self) -> None:
        with self._rlock:
            if self.fd >= 0 and self._depth == 0:
                os.close(self.fd)
                self.fd = -1


def _open_locked(lock_path: str) -> int:
    """Open and flock the lock file, retrying if the last owner out unlinked it meanwhile."""
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class SharedBlockPool(BlockPool):
    """A ``BlockPool`` over a shared-memory file; ``owner`` is this attachment's slot.

    Open with ``SharedBlockPool.open``; ``close`` (idempotent) drops this attachment's
    references and, when it was the last live one, removes the pool's files."""

    def __init__(self, name: str, pf: _PoolFile, lock: ProcessLock, owner: int, created: bool,
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
        lock = ProcessLock(_open_locked(pool_path(name, "lock")), held=True)
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
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            fd = None
        if fd is not None:
            try:
                pf = _map_pool_file(fd)
                if pf is not None:
                    live = sorted(set(pf.live_owner_pids()))
                    if live:
                        wanted = (num_blocks, block_size, max_owners, fp)
                        have = (pf.h("num_blocks"), pf.h("block_size"), pf.h("max_owners"), pf.h("fingerprint"))
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
                log.warning("KV pool %r: %s has no live owner (left by a crash); recreating it", name, path)
            finally:
                os.close(fd)
        remove_pool_files(name, keep_lock=True)
        _, size = _layout(num_blocks, block_size, max_owners)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            reserve(fd, size, path)
            pf = _PoolFile(fd, size, num_blocks, block_size, max_owners)
        finally:
            os.close(fd)
        pf.views["desc"][:] = np.frombuffer(description.encode()[:DESC_BYTES].ljust(DESC_BYTES, b"\0"), np.uint8)
        for field, value in (("magic", MAGIC), ("version", VERSION), ("num_blocks", num_blocks),
                             ("block_size", block_size), ("max_owners", max_owners), ("fingerprint", fp),
                             ("creator_pid", os.getpid()), ("ready", 1)):
            pf.set_h(field, value)
        return pf, True

    @staticmethod
    def _claim_slot(pf: _PoolFile, name: str) -> int:
        me = os.getpid()
        start = _proc_start_time(me) or 0
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
        pf.set_h("holder_pid", 0)
        # the views stay valid (the mapping lives until the process ends); only stop using it
        self.lock.on_release = lambda: None
        self.lock.on_acquire = self._refuse

    def _refuse(self):
        raise RuntimeError(f"KV pool {self.name!r} was closed by this process")

    # -- crash handling ----------------------------------------------------------------------
    def _on_acquire(self) -> None:
        pf = self._pf
        holder = pf.h("holder_pid")
        if holder and holder != os.getpid():
            # the last holder died inside a critical section: owner_refs is the truth
            log.warning("KV pool %r: pid %d died holding the pool lock; repairing refcounts", self.name, holder)
            self.a.refcount[:] = self.a.owner_refs.sum(axis=0)
            self._reclaim_dead_locked()
        pf.set_h("holder_pid", os.getpid())

    def _on_release(self) -> None:
        self._pf.set_h("holder_pid", 0)

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


def _reclaim_slot(pf: _PoolFile, slot: int) -> int:
    """Drop all references of ``slot`` and free it (caller holds the lock)."""
    refs = pf.arrays.owner_refs[slot]
    n = int(refs.sum())
    pf.arrays.refcount -= refs
    refs[:] = 0
    pf.owner_pid[slot] = 0
    pf.owner_start[slot] = 0
    return n


def reserve(fd: int, size: int, path: str) -> None:
    """Size ``fd`` to ``size`` bytes with the memory committed now: a full tmpfs fails here
    with a clear message instead of SIGBUS on first touch."""
    os.ftruncate(fd, size)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            free = os.statvfs(os.path.dirname(path))
            raise MemoryError(
                f"{path}: needs {size / 2**20:.1f} MiB but {os.path.dirname(path)} has "
                f"{free.f_bavail * free.f_frsize / 2**20:.1f} MiB free — enlarge it (docker --shm-size), "
                "lower kv_cache_memory_mb / num_blocks, or point TRITONKV_SHM_DIR elsewhere") from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise


def remove_pool_files(name: str, keep_lock: bool) -> None:
    """Remove the pool file and its companions (and the lock file unless ``keep_lock``)."""
    lock = pool_path(name, "lock")
    for path in glob.glob(glob.escape(pool_path(name, "")) + "*"):
        if keep_lock and path == lock:
            continue
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def wait_until(predicate: Callable[[], bool], timeout_s: float, period_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(period_s)
    return predicate()


def pool_snapshot(name: str) -> dict | None:
    """Counts and live owner pids of pool ``name`` without attaching (None if there is none):
    for tests, metrics scrapers and operators."""
    lock_path, path = pool_path(name, "lock"), pool_path(name, "pool")
    if not os.path.exists(path):
        return None
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            pfd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return None
        try:
            pf = _map_pool_file(pfd)
        finally:
            os.close(pfd)
        if pf is None:
            return None
        a = pf.arrays
        unused = a.refcount == 0
        snap = {"total": int(len(a.refcount)), "used": int((~unused).sum()),
                "cached": int((unused & (a.block_hash != 0)).sum()),
                "refcounts_consistent": bool((a.refcount == a.owner_refs.sum(axis=0)).all()),
                "owner_pids": [int(p) for p in pf.owner_pid if p],
                "live_owner_pids": pf.live_owner_pids()}
        snap["free"] = snap["total"] - snap["used"] - snap["cached"]
        del a
        pf.close()
        return snap
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def remove_if_stale(name: str) -> bool:
    """Remove pool ``name``'s files if no live process is attached (left by a crash or by a
    server killed before its instances detached). Returns whether files were removed."""
    fd = _open_locked(pool_path(name, "lock"))
    try:
        path = pool_path(name, "pool")
        if os.path.exists(path):
            pfd = os.open(path, os.O_RDWR)
            try:
                pf = _map_pool_file(pfd)
                if pf is not None:
                    live = pf.live_owner_pids()
                    pf.close()
                    if live:
                        return False
            finally:
                os.close(pfd)
        remove_pool_files(name, keep_lock=False)
        return True
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
