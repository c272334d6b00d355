"""A process ends when the parent it was started by is gone.

Rule: once ``os.getppid()`` is no longer the watched pid (the parent died, by SIGKILL too, and
this process was re-parented to init or a subreaper), ``on_gone`` runs, within ``PERIOD_S``.
Users:
- a Python backend stub (``watch_stub_parent``) exits: Triton's stub does not always notice a
  killed server (seen on 2.51 in a private /dev/shm namespace: stubs ran on for an hour after
  their server was killed, each holding its engine core). The engine core then sees its
  frontend gone and frees that frontend's blocks (core/liveness.py). The watch runs only
  inside a stub (never in a test process that builds the model class);
- the OpenAI frontend (``--parent-pid``, the launcher) SIGTERMs itself so uvicorn stops
  gracefully.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

PERIOD_S = 1.0
STUB_NAME = "triton_python_backend_stub"


def watch_parent(parent: int, on_gone: Callable[[], None], period_s: float = PERIOD_S) -> threading.Thread:
    """Start the daemon thread that calls ``on_gone`` once ``parent`` is no longer our parent."""
    def watch():
        while os.getppid() == parent:
            time.sleep(period_s)
        on_gone()

    t = threading.Thread(target=watch, name="tritonkv-parent-watch", daemon=True)
    t.start()
    return t


def in_stub() -> bool:
    """This process is a stub: its executable (Python is embedded there) is the stub binary."""
    try:
        exe = os.readlink("/proc/self/exe")
    except OSError:
        exe = sys.executable or ""
    return os.path.basename(exe) == STUB_NAME


def watch_stub_parent() -> threading.Thread | None:
    """In a stub: exit once its tritonserver is gone; elsewhere None (nothing watched)."""
    if not in_stub():
        return None
    server = os.getppid()

    def gone():
        log.error("tritonserver (pid %d) is gone: this stub exits", server)
        os._exit(1)

    return watch_parent(server, gone)
