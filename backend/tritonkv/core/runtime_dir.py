"""Where engine cores put their sockets: a directory only this user can enter.

Rules:
- The directory is ``$TRITONKV_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/tritonkv``, else
  ``/tmp/tritonkv-<uid>``. It is created with mode 0700; an existing one is used only when it
  is a directory (not a link) owned by this user with no group / other permissions, so no
  other local user can pre-create it, link it elsewhere, or reach a socket inside it.
- A core named N has the socket ``N.sock`` and the lock ``N.lock``: whoever holds an flock on
  the lock file is the core of N (or the frontend that is starting it); the core writes its
  pid into it (``core_pid``). The core removes both
  when it exits, while it still holds the lock; a lock file found without a holder is stale.
- Names come from the pool name and the device; a name that is long or not plain is replaced
  by its hash (UNIX socket paths are limited to 107 bytes).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass

ENV = "TRITONKV_RUNTIME_DIR"
PLAIN_NAME = re.compile(r"[A-Za-z0-9_.-]{1,48}")


class RuntimeDirError(RuntimeError):
    pass


def runtime_dir() -> str:
    path = os.environ.get(ENV)
    if not path:
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        path = os.path.join(xdg, "tritonkv") if xdg and os.path.isdir(xdg) else f"/tmp/tritonkv-{os.getuid()}"
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise RuntimeDirError(f"runtime directory {path} is not a private directory of uid {os.getuid()} "
                              f"(owner uid {st.st_uid}, mode {stat.filemode(st.st_mode)}); remove it or set "
                              f"{ENV} to a directory only you can enter")
    return path


def device_label(device: str, gpu_instance: bool = True, device_id: int = 0) -> str:
    """The device a core for config ``device`` runs on, named without touching CUDA (frontends
    never do): ``cpu0``, ``cuda<N>``. ``auto`` is CUDA for a Triton GPU instance (Triton
    makes those only where GPUs are), as ``engine.factory.pick_device`` decides."""
    if device == "cuda" or (device == "auto" and gpu_instance):
        return f"cuda{device_id}"
    return "cpu0"


def core_name(pool_name: str, device: str) -> str:
    """The core of ``pool_name`` on ``device`` (e.g. ``cpu0``, ``cuda1``)."""
    name = f"{pool_name}-{device}"
    if PLAIN_NAME.fullmatch(name):
        return name
    return "h" + hashlib.blake2b(name.encode(), digest_size=12).hexdigest()


@dataclass(frozen=True)
class CorePaths:
    socket: str
    lock: str

    @property
    def endpoint(self) -> str:
        return f"ipc://{self.socket}"


def core_paths(name: str) -> CorePaths:
    base = os.path.join(runtime_dir(), name)
    return CorePaths(base + ".sock", base + ".lock")


def core_pid(name: str) -> int | None:
    """The pid a core of ``name`` wrote into its lock file (None: no file, or not written yet)."""
    try:
        with open(core_paths(name).lock) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
