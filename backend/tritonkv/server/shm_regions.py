"""The Python backend's shared-memory regions of the servers this launcher starts.

The backend names each stub's region ``<prefix><uuid>`` in /dev/shm; every server gets its
own prefix ``triton_python_backend_shm_region_tritonkv-<token>-`` and a lock file
(``...tritonkv-<token>.lock``, flock'd) whose descriptor tritonserver inherits: the lock is
held exactly while a process of that server lives. After a stop the launcher removes that
server's regions; at every launch it removes the regions of earlier tokens whose lock nobody
holds (a crashed or SIGKILLed server), and their work folders. Names with the default prefix
(other tritonservers) and tokens whose lock is held are never touched, nor files of another
user, nor anything reached through a link.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import tempfile
import time

REGION_DIR = "/dev/shm"
REGION_TAG = "triton_python_backend_shm_region_tritonkv-"
REGION_NAME_RE = re.compile(re.escape(REGION_TAG) + r"([0-9a-f]{16})(?:-[0-9a-f-]+|\.lock)$")
# a server's work folder in the temp directory: "tritonkv-server-<token>-<random>"
WORKDIR_PREFIX = "tritonkv-server-"
WORKDIR_RE = re.compile(re.escape(WORKDIR_PREFIX) + r"([0-9a-f]{16})-[A-Za-z0-9_]+")


def region_prefix(token: str) -> str:
    return f"{REGION_TAG}{token}-"


def region_lock_path(token: str) -> str:
    return os.path.join(REGION_DIR, f"{REGION_TAG}{token}.lock")


def hold_region_lock(token: str) -> int:
    """Create and flock the lock file of ``token``'s regions; the fd goes to tritonserver
    (pass_fds): the lock is held while any process of that server keeps it open."""
    fd = os.open(region_lock_path(token), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def remove_regions(token: str, wait_s: float = 0) -> list[str]:
    """Remove the regions of server ``token`` and its lock file, if nobody holds the lock (a
    server alive keeps it) within ``wait_s``. Returns the names removed."""
    lock = region_lock_path(token)
    try:
        fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW)
    except FileNotFoundError:
        fd = None  # its lock is gone (made before any region, removed last): nobody runs
    except OSError:
        return []
    removed = []
    try:
        if fd is not None:
            if os.fstat(fd).st_uid != os.geteuid():
                return []
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        return []  # a process of that server is alive
                    time.sleep(0.01)
        prefix = region_prefix(token)
        with contextlib.suppress(FileNotFoundError):
            for name in sorted(os.listdir(REGION_DIR)):
                path = os.path.join(REGION_DIR, name)
                if name.startswith(prefix) and REGION_NAME_RE.fullmatch(name):
                    with contextlib.suppress(FileNotFoundError, PermissionError):
                        if os.lstat(path).st_uid == os.geteuid():
                            os.remove(path)
                            removed.append(name)
        if fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(lock)
                removed.append(os.path.basename(lock))
    finally:
        if fd is not None:
            os.close(fd)
    return removed


def region_lock_held(token: str) -> bool:
    """Whether a live process of server ``token`` holds its region lock."""
    try:
        fd = os.open(region_lock_path(token), os.O_RDWR | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    except OSError:
        return True  # cannot tell: treat as alive
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def remove_stale_regions() -> list[str]:
    """Remove what crashed servers of this launcher left in /dev/shm: the regions of every
    token whose lock no live process holds."""
    try:
        names = os.listdir(REGION_DIR)
    except OSError:
        return []
    tokens = sorted({m.group(1) for m in map(REGION_NAME_RE.fullmatch, names) if m})
    removed = []
    for token in tokens:
        removed += remove_regions(token)
    return removed


def remove_stale_workdirs() -> list[str]:
    """Remove this user's work folders (``tritonkv-server-<token>-*`` in the temp directory)
    of servers that are gone: their region lock is held by nobody or was removed."""
    if not os.path.isdir(REGION_DIR):
        return []  # no locks to tell live from dead
    tmp = tempfile.gettempdir()
    removed = []
    with contextlib.suppress(OSError):
        for name in sorted(os.listdir(tmp)):
            m = WORKDIR_RE.fullmatch(name)
            path = os.path.join(tmp, name)
            if m is None or os.lstat(path).st_uid != os.geteuid() or not os.path.isdir(path):
                continue
            if not region_lock_held(m.group(1)):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(name)
    return removed


def server_regions(token: str) -> list[str]:
    """Names in /dev/shm made for server ``token`` (its regions and lock)."""
    with contextlib.suppress(OSError):
        return sorted(n for n in os.listdir(REGION_DIR)
                      if n.startswith(f"{REGION_TAG}{token}") and REGION_NAME_RE.fullmatch(n))
    return []


def protect_regions(token: str) -> None:
    """Make server ``token``'s regions mode 0600 (the backend makes them 0644 itself)."""
    for name in server_regions(token):
        with contextlib.suppress(OSError):
            os.chmod(os.path.join(REGION_DIR, name), 0o600)
