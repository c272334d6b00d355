"""Starting an engine core: the frontend that finds none running starts it.

Rules:
- Whoever holds an flock on the core's lock file is its core, or the frontend starting it.
  A frontend takes the lock without waiting; if it gets it (the file at the path is still the
  one it locked: a core removes its files on the way out), no core runs, and it spawns one,
  handing the locked file over (the child's descriptor shares the lock), so two frontends
  never start two cores of one name. If it does not get it, a core runs or is starting.
- The core runs in its own session (a terminal's SIGHUP or Ctrl-C is not its business: it
  exits when its frontends are gone) from the same Python as the frontend.
- Files of a core that was killed (lock without a holder, socket) are removed by the next
  one who takes the lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
import dataclasses

from tritonkv.config import EngineConfig
from tritonkv.core.runtime_dir import CorePaths, core_paths


def python_executable() -> str:
    """This interpreter (a Triton stub embeds Python: its sys.executable may be the stub)."""
    if os.path.basename(sys.executable or "").startswith("python"):
        return sys.executable
    for candidate in (os.path.join(sys.exec_prefix, "bin", "python3"), shutil.which("python3")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError("no python3 found to start the engine core (sys.executable is "
                       f"{sys.executable!r}); put python3 on PATH")


def take_lock(paths: CorePaths) -> int | None:
    """The core's lock file, locked by us; None if a core (or its starter) holds it."""
    while True:
        fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.fstat(fd).st_ino == os.stat(paths.lock, follow_symlinks=False).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # removed by a core on its way out after we opened it: try again


def core_running(name: str) -> bool:
    """Whether a core of ``name`` runs or is starting (someone holds its lock)."""
    paths = core_paths(name)
    if not os.path.exists(paths.lock):
        return False
    fd = take_lock(paths)
    if fd is None:
        return True
    os.close(fd)  # (its files are the next starter's to remove)
    return False


def remove_stale(name: str, wait_s: float = 2.0) -> None:
    """Remove the files of a dead core of ``name`` once nobody holds its lock (a killed
    process shows as a zombie while its other threads still exit and hold its files: wait
    up to ``wait_s`` for that)."""
    paths = core_paths(name)
    deadline = time.monotonic() + wait_s
    while (fd := take_lock(paths)) is None:
        if time.monotonic() >= deadline:
            return  # (someone else's core by now, or still exiting: the next starter removes them)
        time.sleep(0.02)
    try:
        for path in (paths.socket, paths.lock):
            if os.path.lexists(path):
                os.unlink(path)
    finally:
        os.close(fd)


def start_core(name: str, config: EngineConfig, gpu_instance: bool, device_id: int) -> subprocess.Popen | None:
    """Spawn the core of ``name`` unless one runs or is starting; the child when we started it."""
    paths = core_paths(name)
    fd = take_lock(paths)
    if fd is None:
        return None
    try:
        if os.path.lexists(paths.socket):
            os.unlink(paths.socket)  # a killed core's
        args = [python_executable(), "-m", "tritonkv.core", "--name", name,
                "--config", json.dumps(dataclasses.asdict(config)), "--gpu-instance", str(int(gpu_instance)),
                "--device-id", str(device_id), "--lock-fd", str(fd)]
        return subprocess.Popen(args, pass_fds=(fd,), start_new_session=True, stdin=subprocess.DEVNULL)
    finally:
        os.close(fd)
