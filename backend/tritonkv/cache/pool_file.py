"""The shared pool's files: where they live, how they are named, what the pool file holds.

Files (all in ``shm_dir()``, default /dev/shm; a pool name is ``[A-Za-z0-9_-]+``):
    tritonkv-<name>.lock   flock'd around every pool operation
    tritonkv-<name>.pool   header, owner table, ``PoolArrays``
    tritonkv-<name>.<x>    companions (KV storage, weights) made by whoever opens the pool

The pool file is a sequence of arrays, each starting on an ``ALIGN``-byte boundary: the
header (``HEADER_FIELDS``, int64), a description (``DESC_BYTES`` of UTF-8, what the blocks
hold), the owner table (pid and process start time per slot), then ``PoolArrays``. A file
is valid only with the right magic and version, ``ready`` set (written last by its
creator) and a size that holds its geometry.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import re

import numpy as np

from tritonkv.cache.block_pool import PoolArrays
from tritonkv.cache.process_lock import process_alive

MAGIC = 0x7472_6B76_706F_6F6C  # "trkvpool"
VERSION = 1
HEADER_FIELDS = ("magic", "version", "num_blocks", "block_size", "max_owners", "fingerprint",
                 "holder_pid", "ready", "creator_pid")
DESC_BYTES = 512
ALIGN = 64
FILE_PREFIX = "tritonkv-"
NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")


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
    return os.path.join(shm_dir(), f"{FILE_PREFIX}{name}.{suffix}")


def fingerprint(description: str) -> int:
    """A stable int64 for 'what this pool holds' (model, dtype, KV shape)."""
    return int.from_bytes(hashlib.blake2b(description.encode(), digest_size=8).digest(), "little") >> 1


def file_layout(num_blocks: int, block_size: int, max_owners: int) -> tuple[dict, int]:
    """name -> (offset, shape, dtype) of every array in the pool file, and the file size."""
    fields = {"header": ((len(HEADER_FIELDS),), np.int64), "desc": ((DESC_BYTES,), np.uint8),
              "owner_pid": ((max_owners,), np.int64), "owner_start": ((max_owners,), np.int64),
              **PoolArrays.layout(num_blocks, block_size, max_owners)}
    out, offset = {}, 0
    for name, (shape, dtype) in fields.items():
        out[name] = (offset, shape, dtype)
        offset += -(-int(np.prod(shape)) * np.dtype(dtype).itemsize // ALIGN) * ALIGN
    return out, offset


class PoolFile:
    """The mapped pool file: header, owner table and the pool's arrays."""

    def __init__(self, fd: int, size: int, num_blocks: int, block_size: int, max_owners: int):
        self.mm = mmap.mmap(fd, size)
        layout, _ = file_layout(num_blocks, block_size, max_owners)
        self.views = {name: np.frombuffer(self.mm, dtype, int(np.prod(shape)), off).reshape(shape)
                      for name, (off, shape, dtype) in layout.items()}
        self._header = self.views["header"]
        self.owner_pid = self.views["owner_pid"]
        self.owner_start = self.views["owner_start"]
        self.arrays = PoolArrays(**{k: self.views[k] for k in PoolArrays.layout(1, 1, 1)})

    def header(self, field: str) -> int:
        return int(self._header[HEADER_FIELDS.index(field)])

    def set_header(self, field: str, value: int) -> None:
        self._header[HEADER_FIELDS.index(field)] = value

    def live_owner_pids(self) -> list[int]:
        """Pids of the owner slots whose process (same start time) is still running."""
        return [int(p) for p, s in zip(self.owner_pid, self.owner_start)
                if p and process_alive(int(p), int(s))]

    @property
    def description(self) -> str:
        return bytes(self.views["desc"]).rstrip(b"\0").decode(errors="replace")

    def close(self) -> None:
        self.views = self._header = self.owner_pid = self.owner_start = self.arrays = None
        try:
            self.mm.close()
        except BufferError:  # a caller still holds a view; the mapping goes with the process
            pass


def open_pool_file(path: str) -> PoolFile | None:
    """The pool file at ``path``, mapped; None if there is none or it is not a valid, ready
    pool file. Call with the pool's lock held."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        geometry = _read_geometry(fd)
        return None if geometry is None else PoolFile(fd, os.fstat(fd).st_size, *geometry)
    finally:
        os.close(fd)


def _read_geometry(fd: int) -> tuple[int, int, int] | None:
    """(num_blocks, block_size, max_owners) from a valid pool file, else None."""
    head = os.pread(fd, 8 * len(HEADER_FIELDS), 0)
    if len(head) < 8 * len(HEADER_FIELDS):
        return None
    h = np.frombuffer(head, np.int64)
    if h[0] != MAGIC or h[1] != VERSION or not h[HEADER_FIELDS.index("ready")]:
        return None
    nb, bs, mo = (int(h[HEADER_FIELDS.index(f)]) for f in ("num_blocks", "block_size", "max_owners"))
    if file_layout(nb, bs, mo)[1] > os.fstat(fd).st_size:
        return None
    return nb, bs, mo


def create_pool_file(path: str, num_blocks: int, block_size: int, max_owners: int, fp: int,
                     description: str) -> PoolFile:
    """A new, zeroed pool file at ``path`` (replacing any), marked ready; ``fp`` is the
    ``fingerprint`` attachers must match. Call with the pool's lock held."""
    _, size = file_layout(num_blocks, block_size, max_owners)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # private to this user even when an older file of another mode is reused
        reserve(fd, size, path)
        pf = PoolFile(fd, size, num_blocks, block_size, max_owners)
    finally:
        os.close(fd)
    pf.views["desc"][:] = np.frombuffer(description.encode()[:DESC_BYTES].ljust(DESC_BYTES, b"\0"), np.uint8)
    for field, value in (("magic", MAGIC), ("version", VERSION), ("num_blocks", num_blocks),
                         ("block_size", block_size), ("max_owners", max_owners), ("fingerprint", fp),
                         ("creator_pid", os.getpid()), ("ready", 1)):
        pf.set_header(field, value)
    return pf


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
