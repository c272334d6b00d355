"""Tools for operators, launchers and tests that inspect or remove pools without attaching.

Rules:
- ``pool_snapshot`` and ``remove_if_stale`` take the pool's lock, so they never see a
  half-made or half-removed pool; ``remove_pool_files`` expects its caller to hold it.
- A pool is stale when its file exists but no live process holds an owner slot in it
  (left by a crash, or by a server killed before its instances detached).
"""

from __future__ import annotations

import glob
import os
import re

from tritonkv.cache.block_pool import BlockPool
from tritonkv.cache.pool_file import FILE_PREFIX, PoolFile, open_pool_file, pool_path, shm_dir
from tritonkv.cache.process_lock import file_locked

# ``engine.factory.shared_pool_name``: one pool per device, ``<pool_name>-<device type><index>``
DEVICE_SUFFIX_RE = re.compile(r"-[a-z]+[0-9]+")


def device_pools(pool_name: str) -> list[str]:
    """Names of the per-device pools of ``pool_name`` that have a pool file, sorted."""
    pattern = os.path.join(glob.escape(shm_dir()), glob.escape(f"{FILE_PREFIX}{pool_name}-") + "*.pool")
    names = (os.path.basename(path)[len(FILE_PREFIX):-len(".pool")] for path in glob.glob(pattern))
    return sorted(n for n in names if DEVICE_SUFFIX_RE.fullmatch(n[len(pool_name):]))


def pool_snapshot(name: str) -> dict | None:
    """Counts (``BlockPool.counts``), refcount consistency and owner pids of pool ``name``
    without attaching (None if there is none): for tests, metrics scrapers and operators."""
    if not os.path.exists(pool_path(name, "pool")):
        return None
    with file_locked(pool_path(name, "lock")):
        pf = open_pool_file(pool_path(name, "pool"))
        if pf is None:
            return None
        try:
            return _snapshot(pf)
        finally:
            pf.close()


def _snapshot(pf: PoolFile) -> dict:
    a = pf.arrays
    return {**BlockPool(a).counts(), "refcounts_consistent": bool((a.refcount == a.owner_refs.sum(axis=0)).all()),
            "owner_pids": [int(p) for p in pf.owner_pid if p], "live_owner_pids": pf.live_owner_pids()}


def remove_if_stale(name: str) -> bool:
    """Remove pool ``name``'s files if it is stale or invalid. Returns whether files were removed."""
    with file_locked(pool_path(name, "lock")):
        pf = open_pool_file(pool_path(name, "pool"))
        if pf is not None:
            live = pf.live_owner_pids()
            pf.close()
            if live:
                return False
        remove_pool_files(name, keep_lock=False)
        return True


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
