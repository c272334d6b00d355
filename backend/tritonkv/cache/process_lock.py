"""Process liveness from /proc, and a lock that is exclusive across processes.

Rules:
- A process is identified by (pid, start time): a pid reused by a later process, a zombie,
  or a dead process is not alive.
- The cross-process lock is ``flock`` on a lock file: the kernel drops it when its holder
  dies, so a killed process never leaves it held.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Callable, Iterator


def process_start_time(pid: int) -> int | None:
    """Start time (clock ticks since boot) of a live, non-zombie process; None if dead;
    0 when there is no /proc to read it from."""
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
    """Whether ``pid`` runs and is the process that started at ``start_time`` (0: unknown)."""
    if pid <= 0:
        return False
    now = process_start_time(pid)
    return now is not None and (start_time == 0 or now == 0 or now == start_time)


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


def open_locked(lock_path: str) -> int:
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


@contextlib.contextmanager
def file_locked(lock_path: str) -> Iterator[None]:
    """Hold the flock on ``lock_path`` for the ``with`` block (one-off, not reentrant)."""
    fd = open_locked(lock_path)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
